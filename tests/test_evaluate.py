"""Tests of evaluate.py on CPU: tiny models built here (vit_nano, patch 7, 28 px, small heads),
checkpoints written in every supported layout, planted cases with known answers. Nothing is downloaded."""
import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import koleo_proto
import dino
import evaluate
from helpers import malicious_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
QUICK = ["--subset", "120", "--num_workers", "0", "--fewshot_draws", "2", "--fewshot_shots", "1", "3", "--nb_knn", "5", "20"]


# ---------------------------------------------------------------------------------------- helpers
def tiny_network(out_dim=64, seed=0, **head_kw):
    """A teacher-like MultiCropWrapper: vit_nano/7 at 28 px and a small DINOHead."""
    torch.manual_seed(seed)
    backbone = dino.vit_nano(patch_size=7, img_size=28)
    head = dino.DINOHead(backbone.embed_dim, out_dim, hidden_dim=64, bottleneck_dim=32, **head_kw)
    return dino.MultiCropWrapper(backbone, head).eval()


def our_args(**kw):
    return dino.parse_args(["--out_dim", "64", *sum(([f"--{k}", str(v)] for k, v in kw.items()), [])])


def official_args():
    """What an official main_dino.py run stores: no global_crops_size, no data name (trained at 224 px)."""
    return argparse.Namespace(arch="vit_nano", patch_size=7, out_dim=64, norm_last_layer=True, use_fp16=True,
                              data_path="/path/to/imagenet/train", seed=0, global_crops_scale=(0.4, 1.0))


def full_checkpoint(path, teacher, student=None, args=None, **extra):
    """The official layout: student with DDP's 'module.' prefix, teacher without, args as a Namespace."""
    student = student or teacher
    torch.save({"student": {"module." + k: v for k, v in student.state_dict().items()}, "teacher": teacher.state_dict(),
                "optimizer": {}, "epoch": 1, "args": args or official_args(),
                "dino_loss": {"center": torch.zeros(1, 64)}, **extra}, path)
    return str(path)


def images(n=4):
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(1))


def loaded_backbone(path, *argv):
    args = evaluate.parse_args(["--checkpoint", str(path), *argv])
    state, saved, source = evaluate.read_network(args.checkpoint, args.checkpoint_key)
    backbone_state, head_state = evaluate.split_network(state)
    return evaluate.build_backbone(backbone_state, saved, args), head_state, source


def reference_knn(train_f, train_y, test_f, test_y, k, T, C):
    """The official voting, one test image at a time: top-k cosine neighbours vote exp(sim / T)."""
    top1 = top5 = 0
    for x, y in zip(F.normalize(test_f, dim=1), test_y):
        sims = F.normalize(train_f, dim=1) @ x
        s, i = sims.topk(k)
        votes = torch.zeros(C).index_add_(0, train_y[i], (s / T).exp())
        order = votes.argsort(descending=True)
        top1 += int(order[0] == y)
        top5 += int(y in order[:5])
    return 100.0 * top1 / len(test_y), 100.0 * top5 / len(test_y)


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


# One Python process for many command lines: it imports evaluate once (torch takes ~5 s here), then
# forks a child per command line that runs evaluate.main through koleo_proto.run as `python evaluate.py` would, and reports
# the exit code and everything written to stderr (a traceback included).
DRIVER = r"""
import json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
import evaluate
results = []
for i, argv in enumerate(json.loads(sys.argv[3])):
    err = os.path.join(sys.argv[2], f"stderr{i}.txt")
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv, code = ["evaluate.py", *argv], 0
        try:
            evaluate.koleo_proto.run(evaluate.main, "evaluate.py")
        except SystemExit as e:  # the interpreter prints a string exit code and exits with 1
            code = (sys.stderr.write(f"{e.code}\n") and 1) if isinstance(e.code, str) else (e.code or 0)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    results.append([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), open(err).read()])
print(json.dumps(results))
"""


def run_cli_many(tmp_path, cases):
    out = subprocess.run([sys.executable, "-c", DRIVER, ROOT, str(tmp_path), json.dumps(cases)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_one_line_error(code, stderr, *words):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("evaluate.py: error:"), stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


# -------------------------------------------------------------------------------------------- kNN
def test_knn_hand_computed():
    train_f = torch.tensor([[2.0, 0], [0, 1], [0.6, 0.8]])  # not normalized: knn_eval normalizes
    train_y, test_f, test_y = torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0]]), torch.tensor([0])
    # k=1: the neighbour is class 0. k=3: class 0 weighs exp(1/T), class 1 exp(0.6/T) + exp(0/T):
    # T=0.07 -> e^14.3 against e^8.6 + 1, class 0 wins; T=10 -> 1.105 against 1.062 + 1, class 1 wins
    assert evaluate.knn_eval(train_f, train_y, test_f, test_y, [1, 3], 0.07, 2) == {1: (100.0, 100.0), 3: (100.0, 100.0)}
    assert evaluate.knn_eval(train_f, train_y, test_f, test_y, [1, 3], 10.0, 2) == {1: (100.0, 100.0), 3: (0.0, 100.0)}


@pytest.mark.parametrize("n_test", [1, 37])
def test_knn_matches_official_voting_any_test_size(n_test):
    g = torch.Generator().manual_seed(n_test)
    train_f, train_y = torch.randn(300, 16, generator=g), torch.randint(0, 9, (300,), generator=g)
    test_f, test_y = torch.randn(n_test, 16, generator=g), torch.randint(0, 9, (n_test,), generator=g)
    ks = [10, 20, 100, 200]
    got = evaluate.knn_eval(train_f, train_y, test_f, test_y, ks, 0.07, 9)
    for k in ks:
        assert got[k] == pytest.approx(reference_knn(train_f, train_y, test_f, test_y, k, 0.07, 9), abs=1e-9)
    # per-class accuracies weighted by the class sizes give back the overall top-1
    per_class = evaluate.knn_per_class(train_f, train_y, test_f, test_y, 20, 0.07, 9)
    sizes = torch.bincount(test_y, minlength=9).float()
    assert (per_class.nan_to_num() * sizes).sum() / sizes.sum() == pytest.approx(got[20][0], abs=1e-4)


# ---------------------------------------------------------------------------------------- loading
def test_load_our_layout(tmp_path):
    net = tiny_network()
    path = full_checkpoint(tmp_path / "ours.pth", net, args=our_args(), seconds=1.0)
    (backbone, arch, size), head, source = loaded_backbone(path)
    assert (arch, size, source) == ("vit_nano/7", 28, "teacher")
    assert torch.allclose(backbone(images()), net.backbone(images()), atol=1e-6)
    assert torch.equal(evaluate.find_prototypes(head)["head.last_layer"], net.head.last_layer.weight.detach())
    rebuilt = evaluate.build_head(head)
    feats = net.backbone(images()).detach()
    assert torch.allclose(rebuilt(feats), net.head(feats), atol=1e-6)


def test_load_official_dino_layout(tmp_path):
    teacher, student = tiny_network(seed=0), tiny_network(seed=1)
    path = full_checkpoint(tmp_path / "official.pth", teacher, student=student, fp16_scaler={"scale": 65536.0})
    (backbone, arch, size), _, _ = loaded_backbone(path)
    assert (arch, size) == ("vit_nano/7", 28)  # no global_crops_size stored: the resolution of pos_embed
    assert torch.allclose(backbone(images()), teacher.backbone(images()), atol=1e-6)
    (backbone, _, _), _, source = loaded_backbone(path, "--checkpoint_key", "student")  # 'module.' stripped
    assert source == "student" and torch.allclose(backbone(images()), student.backbone(images()), atol=1e-6)


def test_load_official_ibot_layout(tmp_path):
    """iBOT: the student's ViT has a mask token (masked_embed) and a separate patch head last_layer2;
    the teacher's head is shared (last_layer2 is last_layer, stored twice)."""
    student, teacher = tiny_network(seed=0), tiny_network(seed=1)
    s_state = {"module." + k: v for k, v in student.state_dict().items()}
    s_state["module.backbone.masked_embed"] = torch.zeros(1, 128)
    patch_head = dino.WeightNormLinear(32, 48)
    s_state.update({"module.head.last_layer2." + k: v for k, v in patch_head.state_dict().items()})
    t_state = dict(teacher.state_dict())
    t_state.update({"head.last_layer2." + k[len("head.last_layer."):]: v for k, v in teacher.state_dict().items()
                    if k.startswith("head.last_layer.")})
    args = argparse.Namespace(arch="vit_nano", patch_size=7, out_dim=64, patch_out_dim=48, shared_head=False,
                              shared_head_teacher=True, norm_last_layer=False)
    path = tmp_path / "ibot.pth"
    torch.save({"student": s_state, "teacher": t_state, "args": args, "epoch": 1, "ibot_loss": {"center": torch.zeros(1, 64)}}, path)
    (backbone, arch, _), head, _ = loaded_backbone(path, "--checkpoint_key", "student")  # masked_embed ignored
    assert arch == "vit_nano/7" and torch.allclose(backbone(images()), student.backbone(images()), atol=1e-6)
    assert {k: tuple(w.shape) for k, w in evaluate.find_prototypes(head).items()} == {
        "head.last_layer": (64, 32), "head.last_layer2": (48, 32)}
    _, head, _ = loaded_backbone(path)  # the teacher's shared head is audited once
    assert list(evaluate.find_prototypes(head)) == ["head.last_layer"]
    assert evaluate.build_head(head) is not None


@pytest.mark.parametrize("prefix", ["", "backbone.", "module.backbone."])
def test_load_backbone_only(tmp_path, prefix, capsys):
    net = tiny_network()
    path = tmp_path / "dino_nano7_pretrain.pth"
    torch.save({prefix + k: v for k, v in net.backbone.state_dict().items()}, path)
    (backbone, arch, size), head, source = loaded_backbone(path)
    assert (arch, size, source, head) == ("vit_nano/7", 28, "weights", {})
    assert "inferred from the weights: vit_nano/7" in capsys.readouterr().out
    assert torch.allclose(backbone(images()), net.backbone(images()), atol=1e-6)
    with pytest.raises(dino.BadInput, match="embed dim 128, 6 blocks and patch 7, not vit_tiny/7"):
        loaded_backbone(path, "--arch", "vit_tiny")


# --------------------------------------------------------------------------- few-shot and long tail
def test_few_shot_on_separable_features():
    g = torch.Generator().manual_seed(0)
    C, D = 5, 16
    centres = torch.eye(C, D) * 5

    def sample(n):
        y = torch.arange(C).repeat_interleave(n)
        return centres[y] + 0.3 * torch.randn(len(y), D, generator=g), y

    (train_f, train_y), (test_f, test_y) = sample(30), sample(20)
    for classifier in ("linear", "centroid"):
        out = evaluate.few_shot(train_f, train_y, test_f, test_y, [1, 5], 4, 0, classifier, C, 100)
        assert set(out) == {1, 5}
        for n in (1, 5):
            assert out[n]["mean"] == 100.0 and out[n]["ci95"] == 0.0 and len(out[n]["accuracies"]) == 4


def test_few_shot_interval_and_seeded_draws():
    g = torch.Generator().manual_seed(0)
    train_f, train_y = torch.randn(200, 8, generator=g), torch.randint(0, 4, (200,), generator=g)
    test_f, test_y = torch.randn(100, 8, generator=g), torch.randint(0, 4, (100,), generator=g)
    out = evaluate.few_shot(train_f, train_y, test_f, test_y, [2], 6, 3, "centroid", 4, 50)[2]
    a = np.array(out["accuracies"])
    assert out["ci95"] == pytest.approx(1.96 * a.std(ddof=1) / np.sqrt(6)) and out["ci95"] > 0  # draws differ
    assert out == evaluate.few_shot(train_f, train_y, test_f, test_y, [2], 6, 3, "centroid", 4, 50)[2]  # seeded


def test_long_tail_groups_on_planted_counts():
    counts = torch.tensor([500, 101, 100, 20, 19, 1])  # many, many, medium, medium, few, few
    y = torch.arange(6).repeat_interleave(10)
    pred = y.clone()
    pred[y == 1] = 0  # class 1: 0%
    pred[(y == 3).nonzero()[:5]] = 0  # class 3: 50%
    acc = evaluate.per_class_accuracy(pred, y, 7)
    assert acc[:6].tolist() == [100, 0, 100, 50, 100, 100] and acc[6].isnan()  # class 6 has no test image
    groups = evaluate.shot_groups(acc, torch.cat([counts, torch.tensor([3])]))
    assert groups == {"many": dict(accuracy=50.0, classes=2), "medium": dict(accuracy=75.0, classes=2),
                      "few": dict(accuracy=100.0, classes=2)}


# ------------------------------------------------------------------------------ prototype audit
def test_audit_finds_planted_unique_prototypes_cli(tmp_path):
    """37 directions, 5 near copies each (noise 1e-4), in an official-layout checkpoint: the CLI prints 37."""
    g = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.randn(37, 32, generator=g), dim=1)
    planted = directions.repeat_interleave(5, dim=0) + 1e-4 * torch.randn(185, 32, generator=g)
    teacher = tiny_network(out_dim=185)
    with torch.no_grad():
        teacher.head.last_layer.weight_v.copy_(planted * 3)  # any norm: weight_g = 1 normalizes it
    path = full_checkpoint(tmp_path / "collapsed.pth", teacher)
    out = run_cli("--checkpoint", path, "--prototypes")
    assert out.returncode == 0, out.stderr
    assert re.search(r"prototypes head\.last_layer\s+37 / 185 unique at eps 0\.025", out.stdout), out.stdout
    result = json.load(open(tmp_path / "collapsed_eval.json"))["prototypes"]["head.last_layer"]
    assert result["unique"] == 37 and result["largest_groups"] == [5] * 10 and result["groups_with_copies"] == 37
    assert (tmp_path / "collapsed_eval.png").stat().st_size > 10_000


def test_malicious_pickle_is_refused_cli(tmp_path):
    path, marker = malicious_checkpoint(tmp_path)
    out = run_cli("--checkpoint", str(path), "--prototypes")
    assert_one_line_error(out.returncode, out.stderr, "evil.pth", "not a checkpoint torch can load safely")
    assert not os.path.exists(marker)


# ----------------------------------------------------------------------------------- end to end
def test_evaluate_everything_then_from_cache(tmp_path, capsys):
    path = full_checkpoint(tmp_path / "ours.pth", tiny_network(), args=our_args())
    results = evaluate.main(["--checkpoint", path, *QUICK])
    assert {"knn", "linear", "fewshot", "prototypes", "data"} <= set(results)
    assert results["data"]["train_images"] == 120 and results["data"]["image_size"] == 28
    assert 0 <= results["knn"]["20"]["top1"] <= results["knn"]["20"]["top5"] <= 100
    assert set(results["fewshot"]) >= {"1", "3"} and results["linear"]["protocol"] == "fast"
    assert results["prototypes"]["usage"]["images"] == 240 and results["prototypes"]["head.last_layer"]["prototypes"] == 64
    assert (tmp_path / "ours_eval_fashion-mnist.json").exists() and (tmp_path / "ours_eval_fashion-mnist.png").exists()
    assert "from the cache" not in capsys.readouterr().out
    again = evaluate.main(["--checkpoint", path, *QUICK])
    assert capsys.readouterr().out.count("from the cache") == 2  # train and test
    assert again["knn"] == results["knn"] and again["linear"]["top1"] == results["linear"]["top1"]
    os.utime(path, ns=(10**18, 10**18))  # a changed checkpoint invalidates the cache
    evaluate.main(["--checkpoint", path, "--knn", *QUICK])
    assert "from the cache" not in capsys.readouterr().out


def test_long_tail_and_official_linear_protocol(tmp_path):
    path = full_checkpoint(tmp_path / "ours.pth", tiny_network(), args=our_args())
    results = evaluate.main(["--checkpoint", path, "--knn", "--linear", "--long_tail", "10", "--linear_protocol", "official",
                             "--linear_epochs", "1", "--output_dir", str(tmp_path / "out"), *QUICK])
    assert results["linear"]["protocol"] == "official" and 0 <= results["linear"]["top1"] <= 100
    assert set(results["long_tail_groups"]) == {"knn", "linear"}
    assert sum(g["classes"] for g in results["long_tail_groups"]["knn"].values()) == results["data"]["test_classes"]
    assert (tmp_path / "out" / "ours_eval_fashion-mnist_lt10.json").exists()


def write_png(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((28, 28, 3), value, np.uint8)).save(path)


def test_inat2018_layout(tmp_path):
    """The iNaturalist 2018 json layout; category 0 has 3 training images, 1 has 2, 2 has 1."""
    data = tmp_path / "inat"
    for split, cats in (("train", [0, 0, 0, 1, 1, 2]), ("val", [0, 1, 2])):
        imgs = [dict(id=100 * len(split) + i, file_name=f"{split}_val/{c}/{i}.png") for i, c in enumerate(cats)]
        for im, c in zip(imgs, cats):
            write_png(str(data / im["file_name"]), 40 * c + 20)
        json.dump(dict(images=imgs, annotations=[dict(image_id=im["id"], category_id=c) for im, c in zip(imgs, cats)]),
                  open(data / f"{split}2018.json", "w"))
    path = full_checkpoint(tmp_path / "ours.pth", tiny_network(), args=our_args())
    results = evaluate.main(["--checkpoint", path, "--knn", "--data", "inat2018", "--data_path", str(data),
                             "--nb_knn", "1", "--num_workers", "0"])
    assert results["data"]["train_images"] == 6 and results["data"]["classes"] == 3
    assert results["long_tail_groups"]["knn"]["few"]["classes"] == 3


# ------------------------------------------------------------------------------------ bad input
def test_bad_inputs_one_line_each(tmp_path):
    net = tiny_network()
    ours = full_checkpoint(tmp_path / "ours.pth", net, args=our_args())
    bare = tmp_path / "bare.pth"
    torch.save(net.backbone.state_dict(), bare)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\xa5" + bytes(range(256)) * 4)  # a pickle of "protocol 165": torch warns, then fails
    folder = tmp_path / "folder"
    for split, classes in (("train", "ab"), ("val", "ac")):
        for c in classes:
            write_png(str(folder / split / c / "0.png"), 100)
    cases = {
        "missing": (["--checkpoint", str(tmp_path / "missing.pth")], ["no checkpoint at"]),
        "junk": (["--checkpoint", str(junk)], ["junk.pth", "not a checkpoint"]),
        "key": (["--checkpoint", ours, "--checkpoint_key", "momentum"], ["no 'momentum' network", "student, teacher, dino_loss"]),
        "bare key": (["--checkpoint", str(bare), "--checkpoint_key", "teacher"], ["bare weights"]),
        "arch": (["--checkpoint", str(bare), "--arch", "vit_small", "--data", "fashion-mnist"],
                 ["not vit_small/7"]),
        "patch": (["--checkpoint", str(bare), "--patch_size", "4", "--data", "fashion-mnist"],
                  ["not vit_nano/4 (from --arch/--patch_size)"]),
        "no data": (["--checkpoint", str(bare)], ["does not say which data it was trained on"]),
        "no head": (["--checkpoint", str(bare), "--prototypes"], ["no head"]),
        "classes": (["--checkpoint", ours, "--knn", "--data", "folder", "--data_path", str(folder), "--num_workers", "0"],
                    ["classes of the train and val splits differ"]),
        "no inat": (["--checkpoint", ours, "--data", "inat2018", "--data_path", str(tmp_path)], ["train2018.json"]),
        "flag": (["--checkpoint", ours, "--fewshot_draws", "0"], ["--fewshot_draws"]),
        "argparse": (["--checkpoint", ours, "--arch", "vit_huge"], ["invalid choice"]),
    }
    results = run_cli_many(tmp_path, [argv for argv, _ in cases.values()])
    for (name, (_, words)), (code, stderr) in zip(cases.items(), results):
        assert_one_line_error(code, stderr, *words)


# ------------------------------------------------------------------------- defects of issue 16
def test_collapse_cell_is_evaluated_on_its_training_subset(tmp_path, capsys):
    """experiments/collapse.py passes --long_tail but not --subset: evaluate.py takes the
    checkpoint's --subset (and --long_tail) on its training data, so the long-tail groups count
    the images the cell trained on; the test split is the same balanced sample as dino.py's."""
    args = our_args(subset=300, long_tail=10)
    path = full_checkpoint(tmp_path / "cell.pth", tiny_network(), args=args)
    results = evaluate.main(["--checkpoint", path, "--knn", "--long_tail", "10", "--nb_knn", "5",
                             "--num_workers", "0", "--no_cache"])
    train_y = np.asarray(koleo_proto.build_dataset(args, True, None).targets)
    counts = np.bincount(train_y[koleo_proto.training_indices(args, train_y)])
    assert results["data"]["train_images"] == 300 and results["data"]["test_images"] == 300
    data = results["data"]
    assert (data["largest_class"], data["smallest_class"]) == (counts.max(), counts.min())
    assert results["data"]["test_classes"] == 10
    assert "--subset 300: the checkpoint's" in capsys.readouterr().out


def test_checkpoint_without_data_is_not_measured_on_fashion_mnist(tmp_path, capsys):
    """An official checkpoint stores no data name: kNN asked for is one line naming --data, not a
    kNN of 28 px Fashion-MNIST upsampled; with nothing asked only the prototype audit runs."""
    path = full_checkpoint(tmp_path / "official.pth", tiny_network())
    with pytest.raises(evaluate.BadInput, match="does not say which data it was trained on: pass"):
        evaluate.main(["--checkpoint", path, "--knn"])
    results = evaluate.main(["--checkpoint", path])
    assert "prototypes" in results and not {"knn", "linear", "fewshot", "data"} & set(results)
    assert "kNN, linear and few-shot skipped" in capsys.readouterr().out


def test_usage_counts_the_centred_targets_as_the_training_log(tmp_path):
    """dino.py's log counts the argmax of the centred teacher targets; the audit now does too when
    the checkpoint holds the centre (a centre that favours one prototype puts every image there)."""
    center = torch.full((1, 64), 1e3)
    center[0, 5] = -1e3
    path = full_checkpoint(tmp_path / "ours.pth", tiny_network(), args=our_args(),
                           dino_loss={"center": center})
    usage = evaluate.main(["--checkpoint", path, "--knn", "--prototypes", *QUICK])["prototypes"]
    usage = usage["usage"]
    assert usage["used"] == 1 and usage["kind"] == "centred teacher argmax, as dino.py's log"
    vmf = full_checkpoint(tmp_path / "vmf.pth", tiny_network(norm_last_layer=False),
                          args=dino.parse_args(["--out_dim", "64", "--vmf"]),
                          dino_loss={"center": torch.full((1, 64), 1 / 64)})
    usage = evaluate.main(["--checkpoint", vmf, "--knn", "--prototypes", *QUICK])["prototypes"]
    usage = usage["usage"]
    assert usage["kind"].startswith("vMF-centred") and usage["used"] >= 1


def test_fast_linear_probe_refuses_what_would_not_fit(monkeypatch):
    """L-BFGS holds all training features, logits and gradients at once: estimated first, and over
    the memory bound it is one line naming the minibatch protocol, not an out-of-memory crash."""
    x, y = torch.randn(1000, 64), torch.randint(0, 10, (1000,))
    assert len(evaluate.linear_fast(x, y, x[:5], 10, 5)) == 5
    monkeypatch.setattr(evaluate, "available_memory", lambda device: 10**5)  # need: 0.4 MB
    with pytest.raises(evaluate.BadInput, match="use --linear_protocol official"):
        evaluate.linear_fast(x, y, x[:5], 10, 5)


def test_labels_say_what_they_measure(tmp_path, capsys):
    """The 'official' linear protocol is called eval_linear.py's recipe in one process with the
    last epoch (bilinear crops, as it); kNN features in bf16 are flagged as not eval_knn.py's
    fp32; counts over eps are single-linkage groups, not copies."""
    path = full_checkpoint(tmp_path / "ours.pth", tiny_network(), args=our_args())
    assert evaluate.parse_args(["--checkpoint", path]).precision == "auto"  # auto = fp32
    argv = ["--knn", "--linear", "--prototypes", "--precision", "bf16",
            "--linear_protocol", "official"]
    results = evaluate.main(["--checkpoint", path, *argv, "--linear_epochs", "1", *QUICK])
    assert "one process, last epoch (it reports its best)" in results["linear"]["method"]
    out = capsys.readouterr().out
    assert "bf16 features: not eval_knn.py's fp32" in out
    assert "groups vs eps (single linkage)" in out
