r"""Evaluate a DINO-family checkpoint: kNN, linear probe, few-shot, long-tailed accuracy, and the
prototype-collapse audit of Govindarajan et al. (BMVC 2024, "On Partial Prototype Collapse in the
DINO Family of Self-Supervised Methods").

The paper's claims are measured claims: only 1-15% of the K prototypes of DINO, iBOT, ... are
unique, and keeping them apart (KoLeo-Proto) changes kNN, linear, few-shot and long-tailed
accuracy. This file measures all of these for dino.py checkpoints and for the official DINO and
iBOT releases, reusing dino.py (models) and koleo_proto.py (data, kNN, collapse detection).

Read top to bottom:
  1. arguments                         4. evaluations: kNN, linear probe, few-shot, long-tail groups
  2. loading any DINO/iBOT checkpoint  5. prototype audit and its figure
  3. data and cached features          6. main: one table, one JSON, one PNG
Runs (all that applies, or what is asked for; --prototypes alone reads the head, no data):
  python evaluate.py --checkpoint runs/dino-fashion-mnist/checkpoint.pth  # ~40 s on 2 CPU cores
  python evaluate.py --checkpoint dino_deitsmall16_pretrain_full_checkpoint.pth --prototypes
  python evaluate.py --checkpoint official:dino_vits16 --prototypes  # a release, fetched once
  python evaluate.py --checkpoint ckpt.pth --linear --linear_protocol official \
      --data imagenet --data_path /imagenet
  python evaluate.py --checkpoint ckpt.pth --data inat2018 --data_path /inat2018  # long-tail groups
Results go to <checkpoint name>_eval[_<data>].json (and .png) beside the checkpoint, or to
--output_dir, with a feature cache so that a second evaluation skips the backbone.
"""
import argparse
import hashlib
import json
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import models, transforms
from tqdm import tqdm

import dino
import koleo_proto
import official_checkpoints
from koleo_proto import BadInput

NATIVE_SIZE = {"fashion-mnist": 28, "fashion-mnist-full": 28, "cifar10": 32, "cifar100": 32}  # px
SHOT_GROUPS = (("many", 101, math.inf), ("medium", 20, 100), ("few", 0, 19))  # images per class


# 1. Arguments -------------------------------------------------------------------------------------
def get_args_parser():
    p = koleo_proto.OneLineParser("evaluate.py", formatter_class=koleo_proto.HelpFormatter,
                                  description="kNN, linear, few-shot, long-tail and "
                                  "prototype-collapse evaluation of a DINO-family checkpoint. "
                                  "Without --knn/--linear/--fewshot/--prototypes, all that apply "
                                  "run.")
    add = p.add_argument  # a flag that defaults to None says in [brackets] what None means
    add("--checkpoint", required=True, help="dino.py, official DINO, iBOT or EsViT checkpoint, "
        "backbone-only weights (.pth), or official:NAME, a release's full checkpoint fetched "
        "once into torch.hub's cache (official_checkpoints.py); NAME: "
        + ", ".join(official_checkpoints.RELEASES))
    add("--checkpoint_key", help="network of a full checkpoint to evaluate [default: teacher]")
    add("--arch", choices=list(dino.ARCHS),
        help="backbone when the checkpoint stores no args [default: inferred from the weights]")
    add("--patch_size", type=int,
        help="ViT patch size when the checkpoint stores no args [default: inferred]")
    add("--knn", action="store_true",
        help="weighted kNN on the last block's CLS token (DINO's protocol)")
    add("--linear", action="store_true", help="linear probe on frozen features")
    add("--fewshot", action="store_true",
        help="N-shot classification over random draws of the support set")
    add("--prototypes", action="store_true",
        help="prototype-collapse audit of the head (needs no data when alone)")
    add("--data", choices=list(koleo_proto.DATASETS) + ["inat2018"],
        help="dataset [default: the checkpoint's --data; without one only --prototypes runs]")
    add("--data_path", help="dataset folder (as dino.py; inat2018: the folder with "
        "train2018.json, val2018.json)")
    add("--long_tail", type=float, metavar="RHO", help="long-tailed training split "
        "as dino.py --long_tail RHO [default: the checkpoint's, on its data]")
    add("--seed", type=int, help="seed of the long-tail subset and few-shot draws "
        "[default: the checkpoint's, else 0]")
    add("--subset", type=int, help="use N training and N test images, a seeded sample "
        "keeping each class's share, as dino.py [default: the checkpoint's, on its data]")
    add("--image_size", type=int,
        help="side of the evaluated crop [default: the checkpoint's training crop]")
    add("--n_last_blocks", type=int, help="linear probe reads the CLS of the last n blocks "
        "[default: official, 4; ViT-B 1]")
    add("--avgpool_patchtokens", type=koleo_proto.bool_flag, help="linear probe also reads the "
        "mean patch token [default: official, ViT-B only]")
    add("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200],
        help="k values of the kNN classifier; k=20 (else the first) is the headline")
    add("--temperature", type=float, default=0.07, help="kNN vote temperature")
    add("--linear_protocol", default="fast", choices=["fast", "official"],
        help="fast: logistic regression on cached features (CPU, seconds); official: "
        "eval_linear.py's recipe in one process, last-epoch accuracy (GPU, hours)")
    add("--linear_steps", type=int, default=1000, help="fast protocol and few-shot: most "
        "L-BFGS steps (stops earlier when converged)")
    add("--linear_epochs", type=int, default=100, help="official protocol: epochs")
    add("--linear_lr", type=float, default=0.001,
        help="official protocol: SGD lr at batch 256 (scaled linearly)")
    add("--linear_batch", type=int, default=128, help="official protocol: batch size")
    add("--fewshot_shots", type=int, nargs="+", default=[1, 5, 13],
        help="support images per class (13 is ~1%% of ImageNet)")
    add("--fewshot_draws", type=int, default=10, help="random draws of the support set per N")
    add("--fewshot_classifier", default="linear", choices=["linear", "centroid"],
        help="logistic regression on L2-normalized features, or the nearest class mean by cosine")
    add("--num_workers", type=int, default=2, help="data-loading processes")
    add("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
        help="autocast dtype of the features (auto: fp32, where kNN is eval_knn.py's; "
        "bf16 is faster on a GPU)")
    add("--output_dir",
        help="where the JSON, PNG and feature cache go [default: beside the checkpoint]")
    add("--no_cache", action="store_true", help="neither read nor write cached features")
    return p


def parse_args(argv=None):
    args = get_args_parser().parse_args(argv)
    for flag in ("subset", "image_size", "n_last_blocks", "linear_steps", "linear_epochs",
                 "linear_batch", "fewshot_draws"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise BadInput(f"--{flag} must be at least 1")
    if min(args.nb_knn + args.fewshot_shots) < 1 or args.temperature <= 0:
        raise BadInput("--nb_knn and --fewshot_shots must be >= 1 and --temperature > 0")
    if args.long_tail is not None and args.long_tail < 1:
        raise BadInput("--long_tail RHO must be >= 1 (RHO = largest / smallest class)")
    if args.checkpoint.startswith(official_checkpoints.PREFIX):  # results in runs/, not the cache
        name = args.checkpoint[len(official_checkpoints.PREFIX):]
        args.checkpoint = official_checkpoints.resolve(name)
        args.output_dir = args.output_dir or os.path.join("runs", "official", name)
    args.output_dir = args.output_dir or os.path.dirname(os.path.abspath(args.checkpoint))
    return args


# 2. Loading: dino.py and official DINO / iBOT / EsViT full checkpoints, backbone-only weights -----
def read_network(path, key):
    """(state dict of one network without 'module.', the checkpoint's args as a dict, its name).
    Full checkpoints hold 'student' (DDP's 'module.' prefix), 'teacher' and 'args' (a Namespace);
    backbone-only files (dino_deitsmall16_pretrain.pth) are a bare state dict."""
    ckpt = koleo_proto.safe_load(path)  # weights_only: a pickle that would run code is refused
    if not isinstance(ckpt, dict) or not ckpt:
        raise BadInput(f"{path} holds a {type(ckpt).__name__}, "
                       "not a checkpoint dict or a state dict")
    saved = ckpt.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    saved = saved if isinstance(saved, dict) else {}
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        if key is not None:
            raise BadInput(f"{path} holds bare weights, no networks by name: "
                           f"leave out --checkpoint_key {key}")
        state, source = ckpt, "weights"
    else:
        source = key or next((k for k in ("teacher", "state_dict", "model") if k in ckpt),
                             "teacher")
        if not isinstance(ckpt.get(source), dict):
            networks = [str(k) for k, v in ckpt.items() if isinstance(v, dict)
                        and any(isinstance(t, torch.Tensor) for t in v.values())]
            raise BadInput(f"{path} has no '{source}' network; it holds: "
                           f"{', '.join(networks) or 'none'} (pick one with --checkpoint_key)")
        state = ckpt[source]
    state = {k: v for k, v in koleo_proto.strip_prefix(state).items()
             if isinstance(v, torch.Tensor)}
    if not state:
        raise BadInput(f"{path}: '{source}' holds no weights")
    return state, saved, source


def split_network(state):
    """(backbone, head) state dicts of a MultiCropWrapper; weights without 'backbone.' are a bare
    backbone, whose 'head.*' / 'fc.*' is a supervised classifier, not DINO's head, unless it has
    prototypes: EsViT's Swin carries its heads ('head', 'head_dense') itself, with no wrapper."""
    if any(k.startswith("backbone.") for k in state):
        return ({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")},
                {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
    heads = find_heads(state)
    return ({k: v for k, v in state.items() if k.split(".")[0] not in {*heads, "head", "fc"}},
            heads.get("head", {}))


LAST_LAYER = r"(last_layer\d*)\.(weight_v|weight|parametrizations\.weight\.original1)"


def find_heads(state):
    """{name: head state dict} of every head of a network that ends in prototypes, wherever the
    backbone is: 'head' (DINO, iBOT, EsViT), 'head_dense' (EsViT's region-level head), ..."""
    names = sorted({m[1] for k in state if (m := re.fullmatch(r"([^.]+)\." + LAST_LAYER, k))})
    return {n: {k[len(n) + 1:]: w for k, w in state.items() if k.startswith(n + ".")}
            for n in names}


def find_prototypes(head, name="head"):
    """{name.layer: (K, D) prototypes} of every last layer of a head: weight-normalized (weight_g *
    weight_v / ||weight_v||; torch's newer parametrization stores them as original0 / original1)
    or plain. DINO has last_layer; iBOT also last_layer2 (patch tokens), the same tensor when the
    head is shared, then counted once."""
    layers = {}
    for m in [m for k in sorted(head) if (m := re.fullmatch(LAST_LAYER, k))]:  # m[0]: the key
        v = head[m[0]].float()
        g = ".weight_g" if m[2] == "weight_v" else ".parametrizations.weight.original0"
        g = head.get(m[1] + g)
        w = torch._weight_norm(v, g.float(), 0) if m[2] != "weight" and g is not None else v
        if not any(w.shape == o.shape and torch.equal(w, o) for o in layers.values()):
            layers[f"{name}.{m[1]}"] = w
    return layers


def arch_shape(name):
    """(embed_dim, depth, num_heads) of a ViT name, read from dino's builder without building it."""
    return tuple(dino.ARCHS[name].keywords[k] for k in ("embed_dim", "depth", "num_heads"))


def vit_shape(state):
    """(embed_dim, depth, patch_size, img_size) of ViT weights, None if they are not a ViT."""
    if not {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(state):
        return None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    patch = state["patch_embed.proj.weight"].shape[-1]
    side = math.isqrt(state["pos_embed"].shape[1] - 1)  # patches per side; the CLS's comes first
    return state["cls_token"].shape[-1], depth, patch, side * patch


def load_strict(model, state, what):
    """load_state_dict(strict=True), but a mismatch is one line naming the first differences."""
    own = model.state_dict()
    problems = ([f"missing {k}" for k in own if k not in state]
                + [f"unexpected {k}" for k in state if k not in own]
                + [f"{k} is {tuple(state[k].shape)}, expected {tuple(own[k].shape)}" for k in own
                   if k in state and state[k].shape != own[k].shape])
    if problems:
        raise BadInput(f"{what} does not fit the weights ({len(problems)} differences: "
                       f"{'; '.join(problems[:3])})")
    model.load_state_dict(state)


def build_backbone(state, saved, args):
    """A frozen backbone with the checkpoint's weights, its name and training resolution. The
    architecture comes from --arch, else the checkpoint's args, else the weights' shapes."""
    arch = args.arch or (saved.get("arch") or "").replace("deit", "vit") or None  # deit: old name
    origin = "--arch/--patch_size" if args.arch or args.patch_size else "the checkpoint's args"
    shape = vit_shape(state)
    if arch == "resnet50" or (arch is None and "layer4.0.conv1.weight" in state):
        model = models.resnet50()
        model.fc = nn.Identity()  # the official protocols read the pooled 2048-d features
        load_strict(model, state, "resnet50")
        return model.eval(), "resnet50", saved.get("global_crops_size") or 224
    if shape is None:  # e.g. DINO's XCiT, iBOT's and EsViT's Swin: --prototypes needs only heads
        marks = (("Swin", "relative_position_bias_table"), ("XCiT", "cls_attn_blocks."))
        other = next((n for n, mark in marks if any(mark in k for k in state)), None)
        if other or arch not in (None, *dino.ARCHS):
            raise BadInput(f"the backbone is {arch or other}, which is not built here: kNN, linear "
                           "and few-shot need a ViT or a ResNet-50 (--prototypes audits the head)")
        raise BadInput("the weights are neither a ViT nor a ResNet-50 (no cls_token/pos_embed/"
                       "patch_embed): pass a DINO checkpoint")
    dim, depth, patch, img = shape
    names, found = ", ".join(dino.ARCHS), f"embed dim {dim}, {depth} blocks"
    if arch is None:
        arch = next((n for n in dino.ARCHS if n.startswith("vit")
                     and arch_shape(n)[:2] == (dim, depth)), None)
        if arch is None:
            raise BadInput(f"no known ViT has embed dim {dim} and {depth} blocks: "
                           f"pass --arch ({names})")
        print(f"architecture inferred from the weights: {arch}/{patch} ({found})")
    if arch not in dino.ARCHS:
        raise BadInput(f"unknown architecture {arch} in {origin}: pass --arch ({names})")
    want_patch = args.patch_size or saved.get("patch_size") or patch
    if arch == "resnet50" or arch_shape(arch)[:2] != (dim, depth) or want_patch != patch:
        raise BadInput(f"the weights are a ViT with {found} and patch {patch}, not "
                       f"{arch}/{want_patch} (from {origin}): pass the right --arch/--patch_size")
    model = dino.ARCHS[arch](patch_size=patch, img_size=img)  # as stored; other sizes interpolate
    state = {k: v for k, v in state.items() if k != "masked_embed"}  # iBOT's, for masked inputs
    load_strict(model, state, f"{arch}/{patch}")
    return model.eval(), f"{arch}/{patch}", saved.get("global_crops_size") or img


def build_head(head):
    """The DINOHead of the prototypes, rebuilt from the shapes of its weights (for prototype
    usage), or None when the head is of another kind."""
    linears = [k for k in head if re.fullmatch(r"mlp(\.\d+)?\.weight", k) and head[k].ndim == 2]
    if "last_layer.weight_v" not in head or not linears:
        return None
    linears.sort(key=lambda k: int(k.split(".")[1]) if k.count(".") == 2 else 0)
    K, bottleneck = head["last_layer.weight_v"].shape
    hidden, in_dim = head[linears[0]].shape
    module = dino.DINOHead(in_dim, K, use_bn=any(k.endswith("running_mean") for k in head),
                           nlayers=len(linears), hidden_dim=hidden, bottleneck_dim=bottleneck)
    try:  # iBOT's last_layer2 scores patch tokens, not the CLS token
        module.load_state_dict({k: v for k, v in head.items() if not k.startswith("last_layer2")})
    except RuntimeError:
        return None
    return module.eval()


# 3. Data and cached features ----------------------------------------------------------------------
class INat2018(torch.utils.data.Dataset):
    """iNaturalist 2018 as released: root/{train,val}2018.json hold "images" [{id, file_name}] and
    "annotations" [{image_id, category_id}], file names relative to root; 8142 long-tail classes."""

    def __init__(self, root, split, transform):
        path = os.path.join(root or "", f"{split}2018.json")
        if not os.path.isfile(path):
            raise BadInput(f"no {path}: --data inat2018 needs --data_path with train2018.json, "
                           "val2018.json and the images")
        try:
            with open(path) as f:
                meta = json.load(f)
            files = {im["id"]: im["file_name"] for im in meta["images"]}
            pairs = [(files[a["image_id"]], int(a["category_id"])) for a in meta["annotations"]]
        except (ValueError, KeyError, TypeError) as e:
            raise BadInput(f"{path} is not in the iNaturalist 2018 layout "
                           f"({e.__class__.__name__}: {e})") from None
        self.files = [os.path.join(root, f) for f, _ in pairs]
        self.targets, self.transform = [c for _, c in pairs], transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(koleo_proto.pil_loader(self.files[i])), self.targets[i]


def build_splits(args, transform):
    """(train, test) datasets of --data with .targets; their classes must agree."""
    if args.data == "inat2018":
        return tuple(INat2018(args.data_path, split, transform) for split in ("train", "val"))
    train, test = (koleo_proto.build_dataset(args, is_train, transform)
                   for is_train in (True, False))
    if test is None:
        raise BadInput(f"{args.data_path} has no val/ split: kNN, linear and few-shot need "
                       "train/ and val/")
    if getattr(train, "classes", None) != getattr(test, "classes", None):
        only = sorted(set(test.classes) ^ set(train.classes))
        raise BadInput(f"the classes of the train and val splits differ ({len(only)} in only one "
                       f"of them, e.g. {only[:3]})")
    return train, test


class Features(nn.Module):
    """All that the protocols read from a frozen backbone, in one pass: (B, n*D [+ D]), the CLS
    tokens of the last n blocks [+ the last block's mean patch token], as the official
    eval_linear.py feeds its linear layer. The kNN feature, the last block's normed CLS (what
    DINO's teacher outputs), is the slice `cls`. A ResNet gives its pooled (B, 2048) for both."""

    def __init__(self, backbone, n_last_blocks, avgpool):
        super().__init__()
        self.backbone, self.n, self.avgpool = backbone, n_last_blocks, avgpool
        self.vit = isinstance(backbone, dino.VisionTransformer)
        d = backbone.embed_dim if self.vit else 2048
        self.cls = slice((n_last_blocks - 1) * d, n_last_blocks * d) if self.vit else slice(0, d)
        self.dim = (n_last_blocks + avgpool) * d if self.vit else d

    def forward(self, x):
        if not self.vit:
            return self.backbone(x)
        blocks = self.backbone.get_intermediate_layers(x, self.n)  # n x (B, 1 + N, D)
        pooled = [blocks[-1][:, 1:].mean(dim=1)] if self.avgpool else []  # (B, D)
        return torch.cat([b[:, 0] for b in blocks] + pooled, dim=-1)


def cached_features(model, dataset, indices, key, args, device, amp_dtype):
    """(len(indices), F) fp32 features of dataset[indices], from the cache in --output_dir when its
    key matches (checkpoint path, mtime, size, network, data, split, crop, feature kind, images)."""
    images = hashlib.sha1(np.asarray(indices, np.int64).tobytes()).hexdigest()
    text = json.dumps(dict(key, images=images), sort_keys=True)
    name = hashlib.sha1(text.encode()).hexdigest()[:16]
    path = os.path.join(args.output_dir, f"features_{name}.pt")
    if not args.no_cache and os.path.isfile(path):
        try:  # weights_only: a cache file cannot run code either
            cache = torch.load(path, map_location="cpu", weights_only=True)
            if cache["key"] == text:
                print(f"features: {len(indices)} {key['split']} images from the cache {path}")
                return cache["features"]
        except Exception:
            pass  # damaged: recompute
    subset = torch.utils.data.Subset(dataset, [int(i) for i in indices])
    feats = koleo_proto.extract_features(model, subset, args, device, amp_dtype,
                                         with_pixels=False)[0]
    feats = feats.cpu()  # (N, F)
    if not args.no_cache:  # temp file + rename: never half-written
        koleo_proto.save_checkpoint({"key": text, "features": feats}, path)
    return feats


# 4. Evaluations -----------------------------------------------------------------------------------
def knn_eval(train_f, train_y, test_f, test_y, ks, T, num_classes):
    """{k: (top-1, top-5)} of DINO's weighted kNN on L2-normalized features."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    return {k: koleo_proto.knn_classifier(train_f, train_y, test_f, test_y, k, T, num_classes)
            for k in ks}


def knn_per_class(train_f, train_y, test_f, test_y, k, T, num_classes):
    """(C,) kNN top-1 of each class's test images (NaN for a class without any)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    pred = koleo_proto.knn_predict(train_f, train_y, test_f, k, T, num_classes)[:, 0]  # (N_test,)
    return per_class_accuracy(pred, test_y, num_classes)


def per_class_accuracy(pred, y, num_classes):
    """(C,) top-1 percent of each class (NaN for a class without test images)."""
    total = torch.bincount(y, minlength=num_classes).double()
    hits = torch.bincount(y, weights=(pred == y).double(), minlength=num_classes)
    return (100 * hits / total).float()  # 0 / 0 = NaN


def shot_groups(acc, train_counts):
    """Mean per-class accuracy of the many- (>100 training images), medium- (20-100) and few-shot
    (<20) classes: the split of long-tailed recognition (Liu et al., CVPR 2019) on iNaturalist."""
    out = {}
    for name, lo, hi in SHOT_GROUPS:
        m = (train_counts >= lo) & (train_counts <= hi) & ~acc.isnan()
        out[name] = dict(accuracy=float(acc[m].mean()) if m.any() else None, classes=int(m.sum()))
    return out


def fit_linear(x, y, num_classes, steps, weight_decay=1e-4):
    """Multinomial logistic regression on fixed features: a linear layer, cross-entropy plus an L2
    penalty, full batch, L-BFGS (deterministic, no learning rate to tune). Returns the layer."""
    layer = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(layer.weight)  # the problem is convex: any start reaches the same optimum
    nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=steps, history_size=10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y) + weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return layer.requires_grad_(False)


def available_memory(device):
    """Bytes that one solver may take: half the GPU's free memory, or half the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def linear_fast(train_x, train_y, test_x, num_classes, steps):
    """Test predictions of logistic regression on cached features standardized with the training
    statistics (evening the blocks' scales for L-BFGS): a stand-in for the official 100 augmented
    epochs, seconds on CPU for 10^4 images. Full batch, so refused where it would not fit."""
    (n, d), c = train_x.shape, num_classes  # standardized copy; logits, softmax, their gradient
    need = 4 * (n * d + 3 * n * c + 2 * 10 * (d + 1) * c)  # + L-BFGS's 10 pairs of (D + 1) x C
    if need > available_memory(train_x.device):
        raise BadInput(f"the fast linear probe fits all {n} training images at once "
                       f"(~{need / 2**30:.0f} GB): use --linear_protocol official (minibatches), "
                       "or fewer images with --subset")
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    layer = fit_linear((train_x - mean) / std, train_y, num_classes, steps)
    return layer((test_x - mean) / std).argmax(dim=1)


def linear_official(features, train_set, test_set, num_classes, args, device, amp_dtype):
    """Test predictions of the official eval_linear.py's recipe: a linear layer (weights N(0, 0.01),
    bias 0, no BN) on frozen features of augmented images (bilinear RandomResizedCrop + flip), SGD
    momentum 0.9, lr 0.001 * batch / 256, no weight decay, cosine to 0 over 100 epochs. Unlike it:
    one process, and the last epoch's accuracy, not its best one (which picks an epoch on test)."""
    linear = nn.Linear(features.dim, num_classes).to(device)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    lr = args.linear_lr * args.linear_batch / 256
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.linear_epochs, eta_min=0)
    loader = torch.utils.data.DataLoader(train_set, args.linear_batch, shuffle=True,
                                         num_workers=args.num_workers,
                                         generator=torch.Generator().manual_seed(args.seed))

    @torch.no_grad()
    def frozen(x):  # (B, F) in fp32: the backbone stays frozen
        with torch.autocast(device.type, amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return features(x.to(device)).float()

    for _ in tqdm(range(args.linear_epochs), desc="linear (official)"):
        for x, y in loader:
            loss = F.cross_entropy(linear(frozen(x)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        test = torch.utils.data.DataLoader(test_set, 256, num_workers=args.num_workers)
        return torch.cat([linear(frozen(x)).argmax(dim=1).cpu() for x, _ in test])


def few_shot(train_f, train_y, test_f, test_y, shots, draws, seed, classifier, num_classes, steps):
    """{N: dict(mean, ci95, accuracies)}: top-1 over `draws` seeded draws of N training images per
    class; ci95 = 1.96 std / sqrt(draws). Logistic regression on L2-normalized features, as MSN's
    few-shot protocol, or the nearest class mean by cosine."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    by_class = [torch.nonzero(train_y == c).squeeze(1) for c in range(num_classes)]
    out = {}
    for n in shots:
        accs, g = [], torch.Generator().manual_seed(seed)  # the same draws for both classifiers
        for _ in range(draws):
            draw = [i[torch.randperm(len(i), generator=g)[:n]] for i in by_class if len(i)]
            support = torch.cat(draw).to(train_y.device)
            x, y = train_f[support], train_y[support]
            if classifier == "centroid":
                sums = torch.zeros(num_classes, x.shape[1], device=x.device).index_add_(0, y, x)
                scores = test_f @ F.normalize(sums, dim=1).T  # (N_test, C)
            else:
                scores = fit_linear(x, y, num_classes, steps)(test_f)  # (N_test, C)
            scores[:, torch.bincount(y, minlength=num_classes) == 0] = -math.inf  # not in the draw
            accs.append(100 * (scores.argmax(dim=1) == test_y).float().mean().item())
        a = np.array(accs)
        ci95 = 1.96 * a.std(ddof=1 if draws > 1 else 0) / math.sqrt(draws)
        out[n] = dict(mean=float(a.mean()), ci95=float(ci95), accuracies=accs)
    return out


# 5. Prototype audit (the paper's Sec. 4) and its figure -------------------------------------------
def audit_prototypes(w, eps=0.025):
    """Collapse figures of (K, D) prototypes: unique at eps (near copies counted once), the curve
    over eps, nearest-neighbour distances (a dense histogram near 0 = duplicates), the largest
    groups, and the KoLeo-Proto value of those neighbours."""
    sizes = torch.bincount(koleo_proto.prototype_groups(w, eps), minlength=len(w)).cpu()
    sizes = sizes[sizes > 0].sort(descending=True).values  # (unique,)
    nn_dist = koleo_proto.nearest_neighbor_distances(w).cpu()  # (K,)
    # log bins fixed over all chord distances (0 to 2): figures of different checkpoints compare
    counts, edges = np.histogram(nn_dist.clamp(1e-4, 2).numpy(), bins=np.geomspace(1e-4, 2, 44))
    norms = w.norm(dim=1)
    return dict(prototypes=len(w), dim=w.shape[1], eps=eps, unique=len(sizes),
                unique_percent=100.0 * len(sizes) / len(w),
                curve=koleo_proto.unique_prototype_curve(w), largest_groups=sizes[:10].tolist(),
                groups_with_copies=int((sizes > 1).sum()),
                nn_distance_median=float(nn_dist.median()),
                nn_histogram=dict(counts=counts.tolist(), edges=edges.tolist()),
                koleo=float(-torch.log(nn_dist + 1e-8).mean()),
                norm_min=float(norms.min()), norm_max=float(norms.max()))


def teacher_targets(path, saved, head):
    """(features -> logits, name): the head's logits as dino.py's log counts their argmax, with the
    checkpoint's centre (DINO: minus the logit centre; -vMF: vMF normalizer over the probability
    centre, at the final teacher temperature), else the raw head's."""
    ckpt = koleo_proto.safe_load(path)
    loss = next((ckpt[k] for k in ("dino_loss", "ibot_loss") if isinstance(ckpt.get(k), dict)), {})
    center = loss.get("center")
    K, p = head.last_layer.weight_v.shape
    if not isinstance(center, torch.Tensor) or center.numel() != K:
        return head, "raw head argmax: no centre in the checkpoint"
    center = center.float().reshape(1, K).to(head.last_layer.weight_v.device)
    if not saved.get("vmf"):
        return (lambda f: head(f) - center), "centred teacher argmax, as dino.py's log"
    temp = float(saved.get("teacher_temp", 0.04))
    kappa = head.last_layer.weight_g.squeeze(1).abs() / temp
    log_c = dino.vmf_log_normalizer(kappa, p) - center.log()
    return (lambda f: head(f) / temp + log_c), "vMF-centred teacher argmax, as dino.py's log"


def plot_audit(audits, usage_hist, path):
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    n = 3 + (usage_hist is not None)
    fig, ax = plt.subplots(1, n, figsize=(4.3 * n, 3.6))
    for i, (name, a) in enumerate(audits.items()):
        eps, unique = zip(*a["curve"])
        ax[0].semilogx(eps, unique, "o-", label=f"{name} (K={a['prototypes']})")
        h = a["nn_histogram"]
        ax[1].stairs(h["counts"], h["edges"], label=name, fill=i == 0, alpha=0.6)
        ranks = np.arange(1, len(a["largest_groups"]) + 1) + 0.4 * i
        ax[2].bar(ranks, a["largest_groups"], width=0.4 if len(audits) > 1 else 0.8, label=name)
    ax[0].axvline(0.025, color="grey", ls=":")
    ax[0].set_ylim(0, 1.05 * max(a["prototypes"] for a in audits.values()))  # collapse: below K
    ax[0].set(xlabel="eps (chord distance)", ylabel="groups (single linkage)",
              title="groups vs eps: copies at small eps, connectivity at large")
    ax[1].axvline(0.025, color="grey", ls=":")
    ax[1].set(xscale="log", xlabel="distance to the nearest other prototype", ylabel="prototypes",
              title="nearest-neighbour distances")
    ax[2].set(xlabel="rank", ylabel="prototypes in the group",
              title="largest groups of near copies (eps 0.025)")
    if usage_hist is not None:
        counts = usage_hist[usage_hist > 0].sort(descending=True).values.numpy()  # used ones only
        ax[3].loglog(np.arange(1, len(counts) + 1), counts, "o-", ms=3)
        ax[3].set(xlabel="prototype rank", ylabel="images (argmax)",
                  title=f"usage on the data: {len(counts)} / {len(usage_hist)} used")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# 6. Main ------------------------------------------------------------------------------------------
def evaluate_data(args, todo, backbone, train_size, key_base, results, rows, device, amp_dtype):
    """kNN, linear, few-shot and long-tail groups, as `todo` says; returns the (N, D) last-block CLS
    features of the images evaluated (for prototype usage), None if none were extracted."""
    mean, std = koleo_proto.DATASETS.get(args.data, koleo_proto.DATASETS["imagenet"])
    size = args.image_size or train_size
    vit = isinstance(backbone, dino.VisionTransformer)
    patch = backbone.patch_embed.patch_size if vit else None
    if vit and size % patch:
        raise BadInput(f"--image_size {size} is not a multiple of the patch size {patch}")
    notes = ["the checkpoint's training crop" if size == train_size else "from --image_size"]
    if NATIVE_SIZE.get(args.data, size) < size:  # e.g. an ImageNet checkpoint on 28 px images
        notes.append(f"{NATIVE_SIZE[args.data]} px images upsampled" + (
            " to the scale the checkpoint learned (a smaller --image_size is faster)"
            if size == train_size else ""))
    if vit and size != math.isqrt(backbone.patch_embed.num_patches) * patch:
        notes.append("positional embeddings interpolated")
    print(f"images: Resize({size * 256 // 224}) + CenterCrop({size}), DINO's eval view; "
          f"{size} px: {'; '.join(notes)}")
    eval_tf = koleo_proto.eval_transform(argparse.Namespace(global_crops_size=size), mean, std)
    train_set, test_set = build_splits(args, eval_tf)
    train_y_all, test_y_all = np.asarray(train_set.targets), np.asarray(test_set.targets)
    unseen = np.setdiff1d(test_y_all, train_y_all)
    if len(unseen):
        raise BadInput(f"{len(unseen)} classes of the test split have no training image "
                       f"(e.g. class {unseen[0]}): the splits do not match")
    train_idx = koleo_proto.training_indices(args, train_y_all)  # --long_tail, then --subset
    test_idx = koleo_proto.balanced_subset(range(len(test_set)), test_y_all, args.subset, args.seed)
    big = vit and backbone.embed_dim >= 768  # official: ViT-B reads 1 block + avgpool, others 4
    n_blocks = args.n_last_blocks or (1 if big else 4)
    avgpool = args.avgpool_patchtokens if args.avgpool_patchtokens is not None else big
    if vit and n_blocks > len(backbone.blocks):
        raise BadInput(f"--n_last_blocks {n_blocks} exceeds the {len(backbone.blocks)} blocks "
                       "of the backbone")
    features = Features(backbone, n_blocks, avgpool).to(device)
    key = dict(key_base, data=args.data, size=size, precision=str(amp_dtype),
               kind=f"cls{n_blocks}" + ("+avgpool" if avgpool else ""),
               data_path=os.path.abspath(args.data_path) if args.data_path else None)
    train_y = torch.as_tensor(train_y_all[train_idx], device=device)
    test_y = torch.as_tensor(test_y_all[test_idx], device=device)
    C = int(max(train_y_all.max(), test_y_all.max())) + 1
    counts = torch.bincount(train_y.cpu(), minlength=C)
    present = counts[counts > 0]
    classes, largest, smallest = len(present), int(present.max()), int(present.min())
    long_tailed = args.long_tail is not None or args.data == "inat2018"
    results["data"] = dict(name=args.data, data_path=args.data_path, train_images=len(train_idx),
                           test_images=len(test_idx), classes=classes,
                           test_classes=len(test_y.unique()), long_tail=args.long_tail,
                           seed=args.seed, image_size=size, largest_class=largest,
                           smallest_class=smallest)
    spread = f", long-tailed {largest} .. {smallest} per class" if long_tailed else ""
    rows.append(("data", f"{args.data}: {len(train_idx)} train / {len(test_idx)} test images, "
                 f"{classes} classes{spread}"))
    groups, train_cls = {}, None
    fast = todo["linear"] and args.linear_protocol == "fast"
    if todo["knn"] or todo["fewshot"] or todo["prototypes"] or fast:
        full = args.subset is None  # the whole split is cached once and --long_tail indexes it
        indices = np.arange(len(train_set)) if full else train_idx
        train_f = cached_features(features, train_set, indices, dict(key, split="train"), args,
                                  device, amp_dtype)
        train_f = (train_f[torch.as_tensor(train_idx)] if full else train_f).to(device)  # (N, F)
        test_f = cached_features(features, test_set, test_idx, dict(key, split="test"), args,
                                 device, amp_dtype).to(device)
        train_cls, test_cls = train_f[:, features.cls], test_f[:, features.cls]  # (N, D)
    if todo["knn"]:
        knn = knn_eval(train_cls, train_y, test_cls, test_y, args.nb_knn, args.temperature, C)
        head_k = 20 if 20 in knn else args.nb_knn[0]
        results["knn"] = dict(T=args.temperature, headline_k=head_k,
                              **{str(k): dict(top1=a, top5=b) for k, (a, b) in knn.items()})
        fp = "" if amp_dtype is None else f", {args.precision} features: not eval_knn.py's fp32"
        rows.append((f"kNN top-1 (T={args.temperature}{fp})",
                     "  ".join(f"k={k}: {a:.2f}" for k, (a, _) in knn.items())))
        top1, top5 = knn[head_k]
        rows.append((f"kNN k={head_k} (headline)", f"top-1 {top1:.2f}   top-5 {top5:.2f}"))
        if long_tailed:
            acc = knn_per_class(train_cls, train_y, test_cls, test_y, head_k, args.temperature, C)
            groups["knn"] = shot_groups(acc, counts)
    if todo["linear"]:
        t = time.time()
        if fast:
            pred = linear_fast(train_f, train_y, test_f, C, args.linear_steps)
            how = (f"fast: logistic regression, L-BFGS (<= {args.linear_steps} steps) on "
                   "standardized cached features")
        else:
            aug = transforms.Compose([transforms.RandomResizedCrop(size),  # bilinear, as official
                                      transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                      transforms.Normalize(mean, std)])
            train = torch.utils.data.Subset(build_splits(args, aug)[0], [int(i) for i in train_idx])
            test = torch.utils.data.Subset(test_set, [int(i) for i in test_idx])
            pred = linear_official(features, train, test, C, args, device, amp_dtype).to(device)
            how = (f"eval_linear.py's recipe: SGD, {args.linear_epochs} epochs, batch "
                   f"{args.linear_batch}, augmented; one process, last epoch (it reports its best)")
        top1 = 100 * (pred == test_y).float().mean().item()
        what = f"CLS of the last {n_blocks} blocks" + (" + mean patch token" if avgpool else "")
        what = (what if vit else "pooled") + f", {features.dim}-d"
        results["linear"] = dict(protocol=args.linear_protocol, top1=top1, features=what,
                                 method=how, seconds=time.time() - t)
        rows.append((f"linear top-1 ({args.linear_protocol})", f"{top1:.2f}   ({what}; {how})"))
        if long_tailed:
            groups["linear"] = shot_groups(per_class_accuracy(pred, test_y, C), counts)
    if todo["fewshot"]:
        shots = few_shot(train_cls, train_y, test_cls, test_y, args.fewshot_shots,
                         args.fewshot_draws, args.seed, args.fewshot_classifier, C,
                         args.linear_steps)
        results["fewshot"] = dict(classifier=args.fewshot_classifier, draws=args.fewshot_draws,
                                  **{str(n): s for n, s in shots.items()})
        rows.append((f"few-shot top-1 ({args.fewshot_classifier}, {args.fewshot_draws} draws)",
                     "  ".join(f"{n}-shot: {s['mean']:.2f} +- {s['ci95']:.2f}"
                               for n, s in shots.items())))
    if groups:
        results["long_tail_groups"] = groups
        for method, g in groups.items():
            cells = (f"{name}: " + ("-" if v["accuracy"] is None else f"{v['accuracy']:.2f}")
                     + f" ({v['classes']} cl.)" for name, v in g.items())
            rows.append((f"{method} many/medium/few-shot classes", "  ".join(cells)))
    return None if train_cls is None else torch.cat([train_cls, test_cls])


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    state, saved, source = read_network(args.checkpoint, args.checkpoint_key)
    backbone_state, head_state = split_network(state)
    layers = {k: w for name, head in find_heads(state).items()
              for k, w in find_prototypes(head, name).items()}
    if args.seed is None:
        args.seed = int(saved.get("seed", 0))
    if args.data is None and saved.get("data") in koleo_proto.DATASETS:  # its training data
        args.data, args.data_path = saved["data"], args.data_path or saved.get("data_path")
    if (args.data, args.data_path or None) == (saved.get("data"), saved.get("data_path") or None):
        for flag in ("subset", "long_tail"):  # its training data: the images it trained on
            if getattr(args, flag) is None and saved.get(flag):
                setattr(args, flag, saved[flag])
                print(f"--{flag} {saved[flag]}: the checkpoint's, as it trained on these data")
    todo = {k: getattr(args, k) for k in ("knn", "linear", "fewshot", "prototypes")}
    if not any(todo.values()):  # everything that applies
        todo = dict(knn=True, linear=True, fewshot=True, prototypes=bool(layers))
    if args.prototypes and not layers:
        raise BadInput(f"{args.checkpoint} ('{source}') holds no head, so no prototypes to audit "
                       "(backbone-only weights?)")
    asked = [k for k in ("knn", "linear", "fewshot") if todo[k]]
    named = any(getattr(args, k) for k in asked)  # by flag, not as "all that applies"
    built = build_backbone(backbone_state, saved, args) if named else None  # unbuilt: say so first
    if args.data is None and asked:  # e.g. an official checkpoint: no guess, no upsampled 28 px
        if named or not todo["prototypes"]:
            raise BadInput(f"{args.checkpoint} does not say which data it was trained on: pass "
                           "--data (and --data_path) for kNN, linear and few-shot, or --prototypes")
        print("kNN, linear and few-shot skipped: the checkpoint does not name its data (--data)")
        todo.update(knn=False, linear=False, fewshot=False)
    probe = os.path.join(args.output_dir, ".write_test")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise BadInput(f"cannot write to {args.output_dir} ({e.__class__.__name__}): "
                       "pass a writable --output_dir") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)  # auto: fp32
    torch.manual_seed(args.seed)

    results = dict(checkpoint=os.path.abspath(args.checkpoint), network=source)
    rows, usage_feats = [("checkpoint", f"{args.checkpoint} ['{source}']")], None
    stem = os.path.splitext(os.path.basename(args.checkpoint))[0] + "_eval"
    if todo["knn"] or todo["linear"] or todo["fewshot"]:
        backbone, arch, train_size = built or build_backbone(backbone_state, saved, args)
        results["arch"] = arch
        rows[0] = ("checkpoint", f"{args.checkpoint} ['{source}', {arch}]")
        st = os.stat(args.checkpoint)  # the cache key names the file as it is now
        key_base = dict(checkpoint=results["checkpoint"], mtime=st.st_mtime_ns, size=st.st_size,
                        network=source)
        usage_feats = evaluate_data(args, todo, backbone.to(device), train_size, key_base, results,
                                    rows, device, amp_dtype)
        stem += f"_{args.data}" + (f"_lt{args.long_tail:g}" if args.long_tail else "")
    usage_hist = None
    if todo["prototypes"]:
        audits = {}
        for name, w in layers.items():
            a = audits[name] = audit_prototypes(w.to(device))
            copies = a["groups_with_copies"]
            rows.append((f"prototypes {name}", f"{a['unique']} / {a['prototypes']} unique at eps "
                         f"0.025 ({a['unique_percent']:.1f}%), {copies} group{'s' * (copies != 1)} "
                         f"of near copies, largest {a['largest_groups'][:5]}"))
            rows.append(("  groups vs eps (single linkage)",
                         "  ".join(f"{e:g}: {u}" for e, u in a["curve"])))
            rows.append(("  nearest-neighbour distance", f"median {a['nn_distance_median']:.4f}, "
                         f"KoLeo {a['koleo']:.3f}, norms {a['norm_min']:.3g} .. "
                         f"{a['norm_max']:.3g}"))
        head = build_head(head_state) if usage_feats is not None else None
        if head is not None:
            targets, kind = teacher_targets(args.checkpoint, saved, head.to(device))
            with torch.no_grad():  # the argmax prototype of each image
                usage_hist = sum(koleo_proto.assignment_histogram(targets(f))
                                 for f in usage_feats.split(4096)).cpu()
            u = audits["usage"] = dict(images=len(usage_feats), kind=kind,
                                       **koleo_proto.usage_stats(usage_hist))
            rows.append((f"  usage on the data ({kind})", f"{u['used']} / {len(usage_hist)} "
                         f"prototypes used by {u['images']} images, perplexity "
                         f"{u['perplexity']:.1f}"))
        elif usage_feats is not None:
            rows.append(("  usage on the data", "skipped: the head is not a DINOHead"))
        results["prototypes"] = audits
        plot_audit({k: v for k, v in audits.items() if k != "usage"}, usage_hist,
                   os.path.join(args.output_dir, stem + ".png"))
    results["seconds"] = time.time() - t0
    out = os.path.join(args.output_dir, stem + ".json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    width = max(len(name) for name, _ in rows) + 2
    print("\n".join(f"{name:<{width}}{value}" for name, value in rows))
    png = f" and {stem}.png" if "prototypes" in results else ""
    print(f"results: {out}{png} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    koleo_proto.run(main, "evaluate.py")
