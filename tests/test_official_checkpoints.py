"""Offline tests of the audit of released checkpoints (evaluate.py --checkpoint official:NAME, the
layouts of official_checkpoints.RELEASES, experiments/audit_official.py). Nothing is downloaded:
each release is mimicked by a tiny checkpoint written as its training script writes it, with
planted groups of near-copy prototypes, and the network is made unreachable where a download
could start. Where each layout comes from:
  DINO   facebookresearch/dino main_dino.py: save_dict {student, teacher, optimizer, epoch, args
         (argparse.Namespace), dino_loss, fp16_scaler}; MultiCropWrapper keys backbone.* / head.*;
         the student is DDP ('module.'), the teacher too when the backbone has batch norms
         (ResNet-50, XCiT: SyncBatchNorm needs DDP).
  iBOT   bytedance/ibot main_ibot.py and models/head.py: the same save_dict with ibot_loss
         (center, center2); iBOTHead adds last_layer2 for patch tokens, the very same module as
         last_layer when shared (so one storage under two keys); the student's ViT has masked_embed.
  EsViT  microsoft/esvit main_esvit.py: for Swin no MultiCropWrapper, the heads are attributes of
         the backbone, head (view level) and head_dense (region level); dino_loss has center_grid.
"""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torchvision import models

import koleo_proto
import dino
import evaluate
import official_checkpoints
from helpers import assert_one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 16  # bottleneck (prototype) dimension of the tiny heads
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": "",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}


# ---------------------------------------------------------------------------- tiny release files
def planted(K, unique, seed, scale=3.0):
    """(K, D) prototypes: `unique` random directions, each repeated with noise 1e-4 (far below eps
    0.025), rows shuffled; any norm, as weight_v is stored unnormalized."""
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(unique, D, generator=g), dim=1)
    sizes = torch.full((unique,), K // unique)
    sizes[:K % unique] += 1
    w = directions.repeat_interleave(sizes, dim=0) + 1e-4 * torch.randn(K, D, generator=g)
    return scale * w[torch.randperm(K, generator=g)]


def head(in_dim, prototypes, use_bn=False, patch=None, shared=False, learned_g=False):
    """A DINOHead's state dict (the official key names); iBOT's patch head last_layer2 is either
    the same tensors (shared) or its own planted prototypes."""
    h = dino.DINOHead(in_dim, len(prototypes), use_bn=use_bn, hidden_dim=16, bottleneck_dim=D)
    h = h.state_dict()
    h["last_layer.weight_v"] = prototypes
    if learned_g:  # norm_last_layer false (iBOT): g trained, any positive value
        h["last_layer.weight_g"] = torch.rand(len(prototypes), 1) + 0.5
    if shared:
        h["last_layer2.weight_g"] = h["last_layer.weight_g"]  # the same tensors: one storage
        h["last_layer2.weight_v"] = h["last_layer.weight_v"]
    elif patch is not None:
        h["last_layer2.weight_g"] = torch.rand(len(patch), 1) + 0.5
        h["last_layer2.weight_v"] = patch
    return h


def vit(**kw):
    return dino.vit_nano(patch_size=16, img_size=32, **kw).state_dict()  # official ViT key names


def resnet50():
    """Every key of torchvision's ResNet-50 without fc (MultiCropWrapper makes it an Identity), as
    tiny tensors of the right dtype (int64 num_batches_tracked): the audit reads the head only."""
    with torch.device("meta"):
        keys = models.resnet50().state_dict()
    return {k: torch.zeros(1, dtype=v.dtype) for k, v in keys.items() if not k.startswith("fc.")}


def xcit(dim=8):
    """The keys of facebookresearch/xcit's XCiT (one block of each kind): no pos_embed (Fourier
    encoding), a conv patch embedding with batch norm, class-attention blocks."""
    t = lambda *s: torch.randn(*s) if s else torch.randn(dim)
    bn = lambda p: {p + ".weight": t(), p + ".bias": t(), p + ".running_mean": t(),
                    p + ".running_var": t(), p + ".num_batches_tracked": torch.tensor(0)}
    s = {"cls_token": t(1, 1, dim), "pos_embeder.token_projection.weight": t(dim, 64, 1, 1),
         "pos_embeder.token_projection.bias": t(), "patch_embed.proj.0.0.weight": t(dim, 3, 3, 3),
         **bn("patch_embed.proj.0.1"), "norm.weight": t(), "norm.bias": t()}
    for b in ("blocks.0", "cls_attn_blocks.0"):
        for n in ("norm1", "norm2", "attn.proj") + (("norm3",) if b == "blocks.0" else ()):
            s[f"{b}.{n}.weight"], s[f"{b}.{n}.bias"] = (t(dim, dim) if "." in n else t()), t()
        s.update({f"{b}.attn.qkv.weight": t(3 * dim, dim), f"{b}.mlp.fc1.weight": t(4 * dim, dim),
                  f"{b}.mlp.fc2.weight": t(dim, 4 * dim), f"{b}.gamma1": t(), f"{b}.gamma2": t()})
    s.update({"blocks.0.attn.temperature": t(2, 1, 1), "blocks.0.gamma3": t(),
              **bn("blocks.0.local_mp.bn"), "blocks.0.local_mp.conv1.weight": t(dim, 1, 3, 3),
              "blocks.0.local_mp.conv2.weight": t(dim, 1, 3, 3)})
    return s


def swin(dim=8):
    """The keys of a Swin backbone as iBOT's and EsViT's models/swin_transformer.py name them."""
    t = lambda *s: torch.randn(*s) if s else torch.randn(dim)
    b = "layers.0.blocks.0."
    return {"patch_embed.proj.weight": t(dim, 3, 4, 4), "patch_embed.proj.bias": t(),
            "patch_embed.norm.weight": t(), "patch_embed.norm.bias": t(),
            b + "norm1.weight": t(), b + "attn.relative_position_bias_table": t(169, 2),
            b + "attn.relative_position_index": torch.zeros(49, 49, dtype=torch.long),
            b + "attn.qkv.weight": t(3 * dim, dim), b + "attn.proj.weight": t(dim, dim),
            b + "norm2.weight": t(), b + "mlp.fc1.weight": t(4 * dim, dim),
            b + "mlp.fc2.weight": t(dim, 4 * dim),
            "layers.0.downsample.reduction.weight": t(dim, 4 * dim),
            "norm.weight": t(), "norm.bias": t()}


def wrap(backbone, heads):
    """MultiCropWrapper keys: backbone.*, head.* (and EsViT's head_dense.*)."""
    return {**{"backbone." + k: v for k, v in backbone.items()},
            **{f"{name}.{k}": v for name, h in heads.items() for k, v in h.items()}}


def adamw(state):
    """An AdamW state dict as torch 1.7 writes it (integer keys, int step)."""
    return {"state": {0: {"step": 1, "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}},
            "param_groups": [{"lr": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.4,
                              "amsgrad": False, "params": list(range(len(state)))}]}


def dino_args(**kw):
    """main_dino.py's argparse.Namespace (after init_distributed_mode), as pickled in 'args'."""
    a = dict(arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=True,
             momentum_teacher=0.996, use_bn_in_head=False, warmup_teacher_temp=0.04,
             teacher_temp=0.04, warmup_teacher_temp_epochs=0, use_fp16=True, weight_decay=0.04,
             weight_decay_end=0.4, clip_grad=3.0, batch_size_per_gpu=64, epochs=100,
             freeze_last_layer=1, lr=0.0005, warmup_epochs=10, min_lr=1e-06, optimizer="adamw",
             drop_path_rate=0.1, global_crops_scale=(0.4, 1.0), local_crops_number=8,
             local_crops_scale=(0.05, 0.4), data_path="/path/to/imagenet/train",
             output_dir="/checkpoint", saveckp_freq=20, seed=0, num_workers=10, dist_url="env://",
             local_rank=0, rank=0, world_size=8, gpu=0)
    return argparse.Namespace(**{**a, **kw})


def save(path, student, teacher, args, loss_key="dino_loss", loss=None):
    """The official save_dict: student with DDP's 'module.' prefix (the caller adds it to the
    teacher when the release wraps that too), args as a Namespace, fp16 scaler state."""
    torch.save({"student": {"module." + k: v for k, v in student.items()}, "teacher": teacher,
                "optimizer": adamw(student), "epoch": 100, "args": args, loss_key: loss,
                "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                "growth_interval": 2000, "_growth_tracker": 0}}, path)
    return str(path)


def dino_vit(path):
    """ViT-S/16 (the 2021 release was trained as deit_small)."""
    s = wrap(vit(), {"head": head(128, planted(300, 37, 1))})
    t = wrap(vit(), {"head": head(128, planted(300, 23, 2))})
    args = dino_args(arch="deit_small", out_dim=300)
    return save(path, s, t, args, loss={"center": torch.zeros(1, 300)}), \
        {"teacher": {"head.last_layer": 23}, "student": {"head.last_layer": 37}}


def dino_xcit(path):
    s = wrap(xcit(), {"head": head(8, planted(256, 19, 3))})
    t = wrap(xcit(), {"head": head(8, planted(256, 11, 4))})
    t = {"module." + k: v for k, v in t.items()}  # batch norms: the teacher is DDP-wrapped too
    args = dino_args(arch="xcit_small_12_p16", out_dim=256)
    return save(path, s, t, args, loss={"center": torch.zeros(1, 256)}), \
        {"teacher": {"head.last_layer": 11}, "student": {"head.last_layer": 19}}


def ibot_args(**kw):
    """main_ibot.py's Namespace: iBOT's own flags on top of DINO's."""
    return dino_args(**{**dict(arch="vit_small", out_dim=8192, patch_out_dim=8192, shared_head=True,
                               shared_head_teacher=True, norm_last_layer=False, norm_in_head=None,
                               act_in_head="gelu", teacher_temp=0.07, teacher_patch_temp=0.07,
                               pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2], pred_shape="block",
                               pred_start_epoch=0, lambda1=1.0, lambda2=1.0, local_crops_number=10),
                        **kw})


def ibot_vit_shared(path):
    """vits_16's recipe: --shared_head true, so both networks store last_layer2 = last_layer."""
    s = wrap(vit(), {"head": head(128, planted(240, 29, 5), shared=True, learned_g=True)})
    s["backbone.masked_embed"] = torch.zeros(1, 128)  # the student's mask token
    t = wrap(vit(), {"head": head(128, planted(240, 17, 6), shared=True, learned_g=True)})
    loss = {"center": torch.zeros(1, 240), "center2": torch.zeros(1, 1, 240)}
    return save(path, s, t, ibot_args(out_dim=240, patch_out_dim=240), "ibot_loss", loss), \
        {"teacher": {"head.last_layer": 17}, "student": {"head.last_layer": 29}}


def ibot_vit_separate(path):
    """--shared_head false: the student has its own patch head; the teacher's stays shared."""
    s = wrap(vit(), {"head": head(128, planted(240, 29, 5), patch=planted(200, 13, 7),
                                  learned_g=True)})
    s["backbone.masked_embed"] = torch.zeros(1, 128)
    t = wrap(vit(), {"head": head(128, planted(240, 17, 6), shared=True, learned_g=True)})
    loss = {"center": torch.zeros(1, 240), "center2": torch.zeros(1, 1, 240)}
    args = ibot_args(arch="vit_large", out_dim=240, patch_out_dim=200, shared_head=False)
    return save(path, s, t, args, "ibot_loss", loss), \
        {"teacher": {"head.last_layer": 17},
         "student": {"head.last_layer": 29, "head.last_layer2": 13}}


def ibot_swin(path):
    s = wrap({**swin(), "masked_embed": torch.zeros(1, 8)},
             {"head": head(8, planted(200, 21, 8), shared=True)})
    t = wrap(swin(), {"head": head(8, planted(200, 9, 9), shared=True)})
    loss = {"center": torch.zeros(1, 200), "center2": torch.zeros(1, 1, 200)}
    args = ibot_args(arch="swin_tiny", out_dim=200, window_size=7)
    return save(path, s, t, args, "ibot_loss", loss), \
        {"teacher": {"head.last_layer": 9}, "student": {"head.last_layer": 21}}


def esvit_swin(path):
    """Swin-T with both tasks: the heads sit beside the backbone's own keys, no 'backbone.'."""
    s = {**swin(), **wrap({}, {"head": head(8, planted(256, 41, 10)),
                               "head_dense": head(8, planted(256, 31, 11))})}
    t = {**swin(), **wrap({}, {"head": head(8, planted(256, 27, 12)),
                               "head_dense": head(8, planted(256, 15, 13))})}
    args = dino_args(arch="swin_tiny", use_dense_prediction=True, out_dim=256,
                     cfg="experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml",
                     local_crops_number=[8], local_crops_size=[96], aug_opt="dino_aug",
                     use_mixup=False, dataset="imagenet1k", zip_mode=True, opts=[])
    loss = {"center": torch.zeros(1, 256), "center_grid": torch.zeros(1, 256)}
    return save(path, s, t, args, loss=loss), \
        {"teacher": {"head.last_layer": 27, "head_dense.last_layer": 15},
         "student": {"head.last_layer": 41, "head_dense.last_layer": 31}}


LAYOUTS = {"dino_vit": dino_vit, "dino_xcit": dino_xcit, "ibot_vit_shared": ibot_vit_shared,
           "ibot_vit_separate": ibot_vit_separate, "ibot_swin": ibot_swin, "esvit_swin": esvit_swin}


# ------------------------------------------------------------------------------------ the audit
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_release_layout_audits_to_the_planted_counts(tmp_path, layout, capsys):
    path, planted_counts = LAYOUTS[layout](tmp_path / f"{layout}.pth")
    for network, layers in planted_counts.items():
        results = evaluate.main(["--checkpoint", path, "--prototypes", "--checkpoint_key", network,
                                 "--output_dir", str(tmp_path / network)])
        found = {name: a["unique"] for name, a in results["prototypes"].items()}
        assert found == layers, (network, found)
        out = capsys.readouterr().out
        for name, count in layers.items():
            assert re.search(rf"prototypes {re.escape(name)}\s+{count} / ", out), out
            assert results["prototypes"][name]["curve"][4] == (0.025, count)


def test_resnet50_head_60000_wide(tmp_path):
    """DINO ResNet-50: batch norms everywhere, so both networks carry 'module.'; BN in the head
    (use_bn_in_head); K = 60,000. The paper's count, 984, planted; counted without the slower
    brute-force figures of the full audit (nearest-neighbour histogram, curve)."""
    s = wrap(resnet50(), {"head": head(2048, planted(60000, 984, 14), use_bn=True)})
    t = {"module." + k: v for k, v in s.items()}
    args = dino_args(arch="resnet50", out_dim=60000, use_bn_in_head=True, optimizer="sgd", lr=0.03,
                     weight_decay=1e-4)
    path = save(tmp_path / "rn50.pth", s, t, args, loss={"center": torch.zeros(1, 60000)})
    state, saved, source = evaluate.read_network(path, None)
    assert source == "teacher" and saved["arch"] == "resnet50"
    backbone, head_state = evaluate.split_network(state)
    assert "layer4.2.bn3.num_batches_tracked" in backbone and "mlp.1.running_mean" in head_state
    layers = {k: w for n, h in evaluate.find_heads(state).items()
              for k, w in evaluate.find_prototypes(h, n).items()}
    assert list(layers) == ["head.last_layer"] and layers["head.last_layer"].shape == (60000, D)
    assert evaluate.koleo_proto.count_unique_prototypes(layers["head.last_layer"]) == 984


def test_unknown_backbone_knn_is_one_clear_line(tmp_path):
    for layout in ("dino_xcit", "esvit_swin", "ibot_swin"):
        path, _ = LAYOUTS[layout](tmp_path / f"{layout}.pth")
        for argv in (["--knn"], ["--linear"]):
            with pytest.raises(dino.BadInput, match="which is not built here") as e:
                evaluate.main(["--checkpoint", path, "--output_dir", str(tmp_path), *argv])
            assert "\n" not in str(e.value)
            assert "xcit_small_12_p16" in str(e.value) or "swin_tiny" in str(e.value)
        # all that applies, and the file names no data: the audit alone
        results = evaluate.main(["--checkpoint", path, "--output_dir", str(tmp_path)])
        assert "prototypes" in results and "knn" not in results


def test_new_style_weight_norm_keys(tmp_path):
    """torch.nn.utils.parametrizations.weight_norm names g and v original0 / original1."""
    w = planted(120, 7, 15)
    h = {"parametrizations.weight.original0": torch.rand(120, 1) + 0.5,
         "parametrizations.weight.original1": w}
    layers = evaluate.find_prototypes({"last_layer." + k: v for k, v in h.items()})
    assert evaluate.koleo_proto.count_unique_prototypes(layers["head.last_layer"]) == 7


def small_resnet50(path, K=500, unique=50):
    s = wrap(resnet50(), {"head": head(2048, planted(K, unique, 16), use_bn=True)})
    t = {"module." + k: v for k, v in s.items()}
    args = dino_args(arch="resnet50", out_dim=K)
    return save(path, s, t, args, loss={"center": torch.zeros(1, K)}), \
        {"teacher": {"head.last_layer": unique}}


# -------------------------------------------------------------------- official:NAME and fetching
def cached(tmp_path, name, layout):
    """A tiny file of `layout` where official:NAME is looked up, with TORCH_HOME=tmp_path/torch."""
    path = tmp_path / "torch" / "hub" / "checkpoints" / official_checkpoints.RELEASES[name].file
    path.parent.mkdir(parents=True, exist_ok=True)
    return layout(path)


def run_evaluate(tmp_path, *argv):
    """`python evaluate.py ...` in tmp_path with TORCH_HOME=tmp_path/torch and every URL
    unreachable (a proxy on a closed local port), so that no test can download anything."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_HOME=str(tmp_path / "torch"), **OFFLINE)
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *argv], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def test_official_name_uses_the_cached_file_and_fails_in_one_line_without_it(tmp_path):
    _, counts = cached(tmp_path, "dino_vits16", dino_vit)
    out = run_evaluate(tmp_path, "--checkpoint", "official:dino_vits16", "--prototypes")
    assert out.returncode == 0, out.stderr
    assert re.search(r"prototypes head\.last_layer\s+23 / 300 unique at eps 0\.025", out.stdout)
    result = json.load(open(tmp_path / "runs" / "official" / "dino_vits16" /
                            "dino_deitsmall16_pretrain_full_checkpoint_eval.json"))
    assert result["prototypes"]["head.last_layer"]["unique"] == counts["teacher"]["head.last_layer"]
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    for f in folder.iterdir():
        f.unlink()
    out = run_evaluate(tmp_path, "--checkpoint", "official:dino_vits16", "--prototypes")
    url = official_checkpoints.RELEASES["dino_vits16"].url
    assert_one_line_error(out, "could not download", url,
                          str(folder / "dino_deitsmall16_pretrain_full_checkpoint.pth"))
    assert list(folder.iterdir()) == []  # nothing half-written


def test_unknown_name_and_esvit_without_sas(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(dino.BadInput, match="unknown official checkpoint 'dino_vits32'") as e:
        evaluate.parse_args(["--checkpoint", "official:dino_vits32"])
    assert all(name in str(e.value) for name in official_checkpoints.RELEASES)
    expected = tmp_path / "hub" / "checkpoints" / "ibot_vits_16_checkpoint.pth"
    assert official_checkpoints.cache_path("ibot_vits16") == str(expected)
    files = {r.file for r in official_checkpoints.RELEASES.values()}
    assert len(files) == len(official_checkpoints.RELEASES)  # no two releases share a cache file
    monkeypatch.delenv("ESVIT_SAS", raising=False)
    with pytest.raises(dino.BadInput, match="set ESVIT_SAS") as e:
        official_checkpoints.resolve("esvit_swint7")
    assert official_checkpoints.RELEASES["esvit_swint7"].url in str(e.value)

    def offline(url, timeout):
        raise official_checkpoints.urllib.error.URLError("network unreachable")

    monkeypatch.setattr(official_checkpoints.urllib.request, "urlopen", offline)
    monkeypatch.setenv("ESVIT_SAS", "?sp=r&sig=SECRET")
    with pytest.raises(dino.BadInput, match=r"download .*best.pth \(network unreachable\)") as e:
        official_checkpoints.resolve("esvit_swint7")
    assert "SECRET" not in str(e.value)  # the access string is not echoed


class FakeResponse:
    """An HTTP response announcing `total` bytes that delivers `data` and then `end()`s."""

    def __init__(self, data, total, end=lambda: b""):
        self.data, self.headers, self.end = data, {"Content-Length": str(total)}, end

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, n):
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk or self.end()


def test_download_is_atomic(tmp_path, monkeypatch, capfd):
    src = tmp_path / "release.pth"
    src.write_bytes(os.urandom(3 << 20))
    dst = tmp_path / "cache" / "checkpoints" / "release.pth"
    dst.parent.mkdir(parents=True)
    (dst.parent / "release.pth.99999999.partial").write_bytes(b"x")  # its download was killed
    assert official_checkpoints.download(src.as_uri(), str(dst)) == str(dst)
    assert dst.read_bytes() == src.read_bytes() and os.listdir(dst.parent) == ["release.pth"]
    assert "release.pth" in capfd.readouterr().err  # the progress bar
    dst.unlink()

    def interrupted():
        raise KeyboardInterrupt

    cases = ((FakeResponse(b"x" * 1000, 5000), dino.BadInput, "1000 of 5000 bytes"),  # closed early
             (FakeResponse(b"x" * 1000, 5000, interrupted), KeyboardInterrupt, ""))  # Ctrl-C
    for response, error, words in cases:
        fake = lambda *_, **k: response  # noqa: E731
        monkeypatch.setattr(official_checkpoints.urllib.request, "urlopen", fake)
        with pytest.raises(error) as e:
            official_checkpoints.download("https://example.org/release.pth", str(dst))
        assert words in str(e.value) and os.listdir(dst.parent) == []  # nothing half-written


# --------------------------------------------------------------------------- audit_official.py
def test_audit_official_table_and_figure(tmp_path, monkeypatch):
    from experiments import audit_official
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name, layout in (("dino_vits16", dino_vit), ("ibot_vitl16_in22k", ibot_vit_separate),
                         ("esvit_swint7", esvit_swin), ("dino_resnet50", small_resnet50)):
        cached(tmp_path, name, layout)
    help_text = audit_official.get_args_parser().format_help()
    assert all(official_checkpoints.RELEASES[n].url in help_text
               for *_, n, _ in audit_official.PAPER if n)
    assert "~0.7 GB" in help_text and "not public" in help_text
    assert audit_official.main(["--output_dir", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "audit_official.md").read_text()
    for row in ("| DINO ViT-S/16 | ImageNet-1K | 65,536 | 1,078 (1.6%) | 23 / 300 (7.7%) |",
                "| iBOT ViT-L/16 | ImageNet-22K | 8,192 | 969 (11.8%) | 17 / 240 (7.1%) |",
                "| EsViT Swin-T/7 | ImageNet-1K | 65,536 | 1,157 (1.8%) | 27 / 256 (10.5%) |",
                "| DINO ResNet-50 | ImageNet-1K | 60,000 | 984 (1.6%) | 50 / 500 (10.0%) |",
                "| iBOT-vMF ViT-B/16 | ImageNet-1K | 8,192 | 1,170 (14.3%) | not public"):
        assert row in table, table
    assert "head_dense.last_layer: 15 / 256" in table
    rows = json.load(open(tmp_path / "out" / "audit_official.json"))
    assert [r.get("unique") for r in rows] == [23, None, 17, 27, 50]
    assert (tmp_path / "out" / "audit_official.png").stat().st_size > 10_000
    os.remove(official_checkpoints.cache_path("dino_resnet50"))  # not fetched without --download
    assert audit_official.main(["--output_dir", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "audit_official.md").read_text()
    assert "not in the cache: rerun with --download (~0.6 GB)" in table
