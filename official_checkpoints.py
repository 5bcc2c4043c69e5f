"""The released *full* checkpoints of the DINO family (the files that hold the prototype heads), by
short name, and their download into torch.hub's cache: `evaluate.py --checkpoint official:NAME`.

Every URL below is the "full ckpt" link of the README that publishes it:
  DINO   facebookresearch/dino README.md, "Pretrained models" (the ViT / ResNet-50 and XCiT tables);
  iBOT   bytedance/ibot README.md, "Pre-Trained Models" (the ImageNet-1K and ImageNet-22K tables);
  EsViT  microsoft/esvit README.md, "Pretrained models", the Swin models trained with both the view-
         and the region-level task (V+R). Its blob store answers only to the read-only access
         string (SAS) that the same README publishes: set ESVIT_SAS to it.
The READMEs state parameter counts (kept below: the backbone's), not file sizes. How each release
writes its file (keys, prefixes, stored args) is mimicked by tests/test_official_checkpoints.py.
A file is fetched only when asked for by name, into torch.hub.get_dir()/checkpoints/ under the
release's file name; iBOT and EsViT name every file checkpoint.pth or checkpoint_best.pth, so the
local name starts with the release folder or NAME.
"""
import glob
import http.client
import os
import urllib.request
from collections import namedtuple

import torch
from tqdm import tqdm

from koleo_proto import BadInput

Release = namedtuple("Release", "url file model params source")

_DINO = "https://dl.fbaipublicfiles.com/dino/{0}/{0}_full_checkpoint.pth"
_IBOT = ("https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/"
         "{}/checkpoint.pth")
_ESVIT = "https://chunyleu.blob.core.windows.net/output/ckpts/esvit/swin/{}/checkpoint_best.pth"
_RUN = "bl_lr0.0005_gpu16_{}multicrop_epoch300"

# NAME: (release folder, model, backbone parameters as the README states them). The DINO names
# are facebookresearch/dino's torch.hub entries.
_DINO_RUNS = {
    "dino_vits16": ("dino_deitsmall16_pretrain", "DINO ViT-S/16", "21M"),
    "dino_vits8": ("dino_deitsmall8_pretrain", "DINO ViT-S/8", "21M"),
    "dino_vitb16": ("dino_vitbase16_pretrain", "DINO ViT-B/16", "85M"),
    "dino_vitb8": ("dino_vitbase8_pretrain", "DINO ViT-B/8", "85M"),
    "dino_resnet50": ("dino_resnet50_pretrain", "DINO ResNet-50", "23M"),
    "dino_xcit_small_12_p16": ("dino_xcit_small_12_p16_pretrain", "DINO XCiT-S12/16", "26M"),
    "dino_xcit_small_12_p8": ("dino_xcit_small_12_p8_pretrain", "DINO XCiT-S12/8", "26M"),
    "dino_xcit_medium_24_p16": ("dino_xcit_medium_24_p16_pretrain", "DINO XCiT-M24/16", "84M"),
    "dino_xcit_medium_24_p8": ("dino_xcit_medium_24_p8_pretrain", "DINO XCiT-M24/8", "84M"),
}
_IBOT_RUNS = {
    "ibot_vits16": ("vits_16", "iBOT ViT-S/16", "21M"),
    "ibot_vitb16": ("vitb_16", "iBOT ViT-B/16", "85M"),
    "ibot_vitb16_rand": ("vitb_16_rand_mask", "iBOT ViT-B/16 (random masks)", "85M"),
    "ibot_vitl16": ("vitl_16", "iBOT ViT-L/16", "307M"),
    "ibot_vitl16_rand": ("vitl_16_rand_mask", "iBOT ViT-L/16 (random masks)", "307M"),
    "ibot_swint7": ("swint_7", "iBOT Swin-T/7", "28M"),
    "ibot_swint14": ("swint_14", "iBOT Swin-T/14", "28M"),
    "ibot_vitb16_in22k": ("vitb_16_pt22k", "iBOT ViT-B/16", "85M"),
    "ibot_vitl16_in22k": ("vitl_16_pt22k", "iBOT ViT-L/16", "307M"),
}
_ESVIT_RUNS = {
    "esvit_swint7": ("swin_tiny/" + _RUN.format("bs32_dense_"), "EsViT Swin-T/7 (V+R)", "28M"),
    "esvit_swins7": ("swin_small/" + _RUN.format("bs32_dense_"), "EsViT Swin-S/7 (V+R)", "49M"),
    "esvit_swinb7": ("swin_base/" + _RUN.format("bs32_") + "_dino_aug/continued_from0200_dense",
                     "EsViT Swin-B/7 (V+R)", "87M"),
    "esvit_swint14": ("swin_tiny/" + _RUN.format("bs32_") + "_dino_aug_window14/"
                      "continued_from0200_dense",
                      "EsViT Swin-T/14 (V+R)", "28M"),
    "esvit_swins14": ("swin_small/" + _RUN.format("bs16_") + "_dino_aug_window14/"
                      "continued_from0180_dense",
                      "EsViT Swin-S/14 (V+R)", "49M"),
    "esvit_swinb14": ("swin_base/bl_lr0.0005_nodes4_gpu16_bs8_multicrop_epoch300_dino_aug_"
                      "window14_lv/"
                      "continued_from_epoch0200_dense_norm_true", "EsViT Swin-B/14 (V+R)", "87M"),
}
RELEASES = {
    **{name: Release(_DINO.format(folder), f"{folder}_full_checkpoint.pth", f"{model}, ImageNet-1K",
                     params, "facebookresearch/dino README.md")
       for name, (folder, model, params) in _DINO_RUNS.items()},
    **{name: Release(_IBOT.format(folder), f"ibot_{folder}_checkpoint.pth",
                     f"{model}, ImageNet-{'22K' if name.endswith('22k') else '1K'}", params,
                     "bytedance/ibot README.md")
       for name, (folder, model, params) in _IBOT_RUNS.items()},
    **{name: Release(_ESVIT.format(folder), f"{name}_checkpoint_best.pth", f"{model}, ImageNet-1K",
                     params, "microsoft/esvit README.md")
       for name, (folder, model, params) in _ESVIT_RUNS.items()},
}
PREFIX = "official:"


def release(name):
    if name not in RELEASES:
        raise BadInput(f"unknown official checkpoint '{name}': known are {', '.join(RELEASES)}")
    return RELEASES[name]


def cache_path(name):
    """Where official:NAME lives: torch.hub.get_dir()/checkpoints/<file> ($TORCH_HOME/hub/...)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", release(name).file)


def resolve(name):
    """The local path of official:NAME, downloaded first if it is not in the cache yet."""
    path, r = cache_path(name), release(name)
    if os.path.isfile(path):
        return path
    url = r.url
    if name.startswith("esvit_"):
        sas = os.environ.get("ESVIT_SAS", "").lstrip("?")
        if not sas:
            raise BadInput(f"{r.url} opens only with the read-only SAS that microsoft/esvit's "
                           f"README publishes: set ESVIT_SAS to it, or download the file by hand "
                           f"to {path}")
        url += "?" + sas
    return download(url, path, shown_url=r.url)


def download(url, path, shown_url=None):
    """url -> path with a progress bar, through a temporary file in the same folder that is renamed
    once every byte the server announced has arrived: a failed or interrupted download leaves
    nothing at path. A failure is one line naming the URL and where to put the file by hand."""
    tmp = f"{path}.{os.getpid()}.partial"
    for stale in glob.glob(glob.escape(path) + ".*.partial"):  # left by a download that was killed
        if not _running(stale[len(path) + 1:-len(".partial")]):
            os.remove(stale)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=os.path.basename(path)) as bar:
                while chunk := response.read(1 << 20):
                    bar.update(f.write(chunk))
            if total is not None and f.tell() != total:
                raise OSError(f"the connection closed after {f.tell()} of {total} bytes")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts
        reason = " ".join(str(getattr(e, "reason", None) or e).split()) or e.__class__.__name__
        raise BadInput(f"could not download {shown_url or url} ({reason}): "
                       f"download it by hand to {path}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _running(pid):
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        pass
    return True
