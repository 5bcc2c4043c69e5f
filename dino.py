"""DINO, self-distillation with no labels (Caron et al., ICCV 2021), in one file.

The method. A student g_s and a teacher g_t of one architecture (backbone, then a head ending in K
prototypes) see different crops of an image: 2 global crops x_1, x_2 and V smaller local ones
(multi-crop, Sec. 3.1); the teacher sees only the global ones. Each turns a crop into a
distribution over the K prototypes, the teacher's centred by c and sharpened by tau_t < tau_s:
    P_s(x) = softmax(g_s(x) / tau_s),  P_t(x) = softmax((g_t(x) - c) / tau_t)            (Eq. 1)
and the student learns to predict the teacher's distribution of every other view:
    L_DINO = mean over x in {x_1, x_2}, x' in all views, x' != x, of H(P_t(x), P_s(x'))   (Eq. 3)
    c <- 0.9 c + 0.1 mean_batch g_t(x)                                                  (Eq. 4)
Centring keeps one prototype from taking every image; sharpening (tau_t 0.04, tau_s 0.1) keeps
the targets from becoming uniform; together they avoid collapse. The teacher gets no gradient:
it is an exponential moving average of the student, theta_t <- m theta_t + (1 - m) theta_s, with
m on a cosine from 0.996 to 1 (Sec. 3.1). The partial-prototype-collapse paper (Govindarajan et
al., BMVC 2024) finds that most of the K prototypes end up as copies of a few, and adds
  --koleo LAMBDA  KoLeo-Proto: L = L_DINO + LAMBDA * (-(1/K) sum_k log min_{j != k} ||w_k - w_j||)
                  on the L2-normalized prototypes w_k (rows of the head's last layer), which
                  spreads them out (koleo_proto.py);
  --vmf           DINO-vMF (Govindarajan et al., ICLR 2023): prototypes of free norm as von
                  Mises-Fisher components, logit_k = w_k^T y / tau + log C_p(||w_k|| / tau),
                  and the teacher centred in probability space.

Read in order: the model (VisionTransformer, DINOHead, MultiCropWrapper), the crops
(DataAugmentationDINO), the loss (DINOLoss), the training step (train_one_epoch: loss, update,
EMA teacher). A divider then marks the plumbing a first reading can skip: flags and presets,
checks, datasets, checkpoints and resume, DDP, kNN evaluation, logging, main (the epoch loop) and
the one-line errors.
Runs:
  python dino.py                                    # bundled Fashion-MNIST sample, CPU, minutes
  python dino.py --koleo 0.1                        # the same with KoLeo-Proto
  torchrun --nproc_per_node 8 dino.py --data imagenet --data_path /imagenet   # official recipe
Names (VisionTransformer, DINOHead, MultiCropWrapper, DINOLoss), flags, defaults and checkpoint
keys are those of facebookresearch/dino, so official checkpoints load here and ours load there.
"""
import argparse
import datetime
import gzip
import json
import math
import os
import shutil
import struct
import sys
import textwrap
import time
import warnings
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision import datasets, models, transforms
from torchvision.ops import StochasticDepth
from tqdm import tqdm

import koleo_proto

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------
# 1. Model: VisionTransformer (official key names), DINOHead, MultiCropWrapper
# ----------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1, self.act = nn.Linear(dim, hidden_dim), nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, dim * 3, bias=qkv_bias), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, C / heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop_path, norm_layer):
        super().__init__()
        self.norm1, self.attn = norm_layer(dim), Attention(dim, num_heads, qkv_bias)
        self.drop_path = StochasticDepth(drop_path, "row")  # drops whole samples' residual branch
        self.norm2, self.mlp = norm_layer(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size, self.num_patches = patch_size, (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al., 2021) as in the official DINO code; forward gives the normed CLS."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # deeper blocks drop more often
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r, norm_layer) for r in rates)
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()  # no classifier: DINO trains the backbone without labels
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

    def interpolate_pos_encoding(self, x, h, w):
        """Bicubic resize of the position grid for crops of another size (local crops, eval)."""
        n = self.pos_embed.shape[1] - 1
        if x.shape[1] - 1 == n and h == w:
            return self.pos_embed
        side, dim = int(math.sqrt(n)), x.shape[-1]
        h0, w0 = h // self.patch_embed.patch_size, w // self.patch_embed.patch_size
        # The official code asks for scale (h0 + 0.1) / side: the 0.1 keeps floor() from losing a
        # row, and the same scale gives the same bicubic weights, so official checkpoints match.
        grid = F.interpolate(self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
                             scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side), mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((self.pos_embed[:, :1], grid), dim=1)

    def prepare_tokens(self, x):
        B, _, h, w = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1 + N, D)
        return x + self.interpolate_pos_encoding(x, h, w)

    def forward(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]  # (B, D)

    def get_intermediate_layers(self, x, n=1):
        """Normed outputs of the last n blocks (the linear-probe protocol reads their CLS)."""
        x, out = self.prepare_tokens(x), []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))
        return out


def init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def vit(embed_dim, depth, num_heads):  # a builder taking patch_size, img_size, drop_path_rate
    return partial(VisionTransformer, embed_dim=embed_dim, depth=depth, num_heads=num_heads)


vit_nano = vit(128, 6, 4)  # not official: small enough to learn Fashion-MNIST on 2 CPU cores
vit_tiny = vit(192, 12, 3)
vit_small = vit(384, 12, 6)
vit_base = vit(768, 12, 12)
vit_large = vit(1024, 24, 16)  # released by iBOT
ARCHS = {"vit_nano": vit_nano, "vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base,
         "vit_large": vit_large, "resnet50": None}


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| per output row (Salimans & Kingma, 2016).
    Parameters are named weight_g (K, 1) and weight_v (K, D), the keys of official checkpoints;
    torch.nn.utils.weight_norm is deprecated and its replacement renames them."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        linear = nn.Linear(in_dim, out_dim, bias=False)  # nn.Linear's init, as the official head
        self.weight_v = nn.Parameter(linear.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    @property
    def weight(self):  # (K, D): the prototypes
        # torch._weight_norm computes g * v / ||v|| (norm per row, dim 0) in the one fused kernel
        # torch.nn.utils.weight_norm runs: at K = 65536 ~10x faster on CPU than the spelled-out
        # formula, whose backward makes several (K, D) temporaries (docs/official_equivalence.md)
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x):
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """3-layer MLP -> L2-normalized bottleneck y -> K prototypes (Caron et al. 2021, Sec. 3.1).
    The logits are w_k^T y: the similarity of the normalized embedding y to each prototype w_k."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3,
                 hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:  # no BN / GELU after the bottleneck layer
                layers += [nn.BatchNorm1d(b), nn.GELU()] if use_bn else [nn.GELU()]
        self.mlp = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
        self.apply(init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        # Unit-norm prototypes make the logits cosine similarities; the paper's Sec. 3 calls
        # freezing g at 1 essential for stability with ViT-B. DINO-vMF lets g train instead.
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck_dim) on the unit sphere
        return self.last_layer(x)  # (B, K)


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per group of same-size crops, then the head once on all of them."""

    def __init__(self, backbone, head):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()  # drop any classifier
        self.backbone, self.head = backbone, head

    def forward(self, x):
        crops = x if isinstance(x, (list, tuple)) else [x]
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end])))  # (n_crops_in_group * B, D)
            start = end
        return self.head(torch.cat(feats))  # (n_crops * B, K), crop-major: crop 0's batch first


def build_backbone(args, drop_path_rate=0.0):
    if args.arch == "resnet50":
        return models.resnet50()  # MultiCropWrapper drops its fc; features are 2048-d
    return ARCHS[args.arch](patch_size=args.patch_size, img_size=args.global_crops_size,
                            drop_path_rate=drop_path_rate)


def build_models(args):
    """Student and teacher of the same architecture; only the student has stochastic depth."""
    student_backbone = build_backbone(args, args.drop_path_rate)
    teacher_backbone = build_backbone(args)
    dim = getattr(student_backbone, "embed_dim", None) or student_backbone.fc.in_features  # ResNet
    head = partial(DINOHead, dim, args.out_dim, use_bn=args.use_bn_in_head,
                   norm_last_layer=args.norm_last_layer, hidden_dim=args.hidden_dim,
                   bottleneck_dim=args.bottleneck_dim)
    return MultiCropWrapper(student_backbone, head()), MultiCropWrapper(teacher_backbone, head())


# ----------------------------------------------------------------------------------------------
# 2. Crops: multi-crop augmentation (Caron et al. 2021, Sec. 3.1 and Appendix)
# ----------------------------------------------------------------------------------------------
class GaussianBlur:
    """Blur with probability p and a random radius (PIL), as the official recipe."""

    def __init__(self, p, radius_min, radius_max):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if torch.rand(()) >= self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class DataAugmentationDINO:
    """2 global views for teacher and student, and local_crops_number small views for the student
    only, which so learns local-to-global correspondence. Blur and solarization differ between the
    two global views (as BYOL's), so that the two are not equally easy."""

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number, global_size,
                 local_size, mean, std):
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2)])
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
        # The official blur radius (0.1 to 2 px) is meant for 224 px crops: scale it with the image
        blur = partial(GaussianBlur, radius_min=0.1 * global_size / 224,
                       radius_max=2.0 * global_size / 224)
        bicubic = transforms.InterpolationMode.BICUBIC
        global_crop = partial(transforms.RandomResizedCrop, global_size, scale=global_crops_scale,
                              interpolation=bicubic)
        self.global_transfo1 = transforms.Compose([global_crop(), flip_and_color_jitter, blur(1.0),
                                                   normalize])
        self.global_transfo2 = transforms.Compose([global_crop(), flip_and_color_jitter, blur(0.1),
                                                   transforms.RandomSolarize(128, p=0.2),
                                                   normalize])
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(local_size, scale=local_crops_scale,
                                         interpolation=bicubic),
            flip_and_color_jitter, blur(0.5), normalize])
        self.local_crops_number = local_crops_number

    def __call__(self, image):
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        return crops + [self.local_transfo(image) for _ in range(self.local_crops_number)]


def eval_transform(args, mean, std):
    """Deterministic view for kNN: the official Resize(256) + CenterCrop(224), scaled to size."""
    size = args.global_crops_size
    return transforms.Compose([
        transforms.Resize(size * 256 // 224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(mean, std)])


# ----------------------------------------------------------------------------------------------
# 3. Loss: DINOLoss (Eq. 1, 3, 4), with DINO-vMF's normalizer and probability centring
# ----------------------------------------------------------------------------------------------
def vmf_log_normalizer(kappa, p):
    """log C_p(kappa) of a von Mises-Fisher density on the unit sphere in R^p, up to a constant:
    C_p(kappa) = kappa^(p/2-1) / ((2 pi)^(p/2) I_(p/2-1)(kappa)). The Bessel function overflows for
    the kappa used here, so log I_nu(nu z) takes the uniform asymptotic expansion for large order nu
    (Abramowitz & Stegun 9.7.7): nu*eta - 0.5*log(2 pi nu) - 0.25*log(1 + z^2),
    eta = sqrt(1 + z^2) + log(z / (1 + sqrt(1 + z^2))); error < 1e-3 nats for p = 256.
    Terms that are the same for every prototype cancel in the softmax and are left out."""
    nu = p / 2 - 1
    z = kappa.float().clamp_min(1e-6) / nu
    root = torch.sqrt(1 + z * z)
    log_bessel = nu * (root + torch.log(z / (1 + root))) - 0.25 * torch.log1p(z * z)
    return nu * torch.log(kappa.float().clamp_min(1e-6)) - log_bessel  # (K,)


class DINOLoss(nn.Module):
    """Cross-entropy between the sharpened, centred teacher distribution of each global view and the
    student distribution of every other view (Caron et al. 2021, Eq. 1, 3 and 4).

    Centring subtracts a running mean of the teacher logits so that no prototype dominates (avoids
    collapse to one cluster); sharpening with a low teacher temperature keeps the targets from
    becoming uniform (the other collapse). The two balance each other.

    With vmf_dim = p (DINO-vMF, Govindarajan et al. 2023), pass the prototype norms: each logit
    gains log C_p(kappa_k), kappa_k = ||w_k|| / tau (each branch its own tau), and the teacher is
    centred in probability space: c is a running mean of the teacher probabilities, and the target
    is softmax(logits / tau - log c), i.e. q_k / c_k renormalized. Logit centring would subtract
    the normalizer itself. The exact centring of the paper is not public in a form we could check;
    this is our reading. c is floored at the smallest normal float: the centre of a prototype that
    is never picked shrinks by the momentum each step, into denormals, and to 0 where they are
    flushed (as on many accelerators), which makes log c = -inf and the targets NaN. While c_k is a
    normal float the floor changes nothing: the targets stay q_k / c_k, on any hardware.
    """

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9,
                 vmf_dim=None):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.ncrops, self.vmf_dim = ncrops, vmf_dim
        center = torch.full((1, out_dim), 1.0 / out_dim) if vmf_dim else torch.zeros(1, out_dim)
        self.register_buffer("center", center)
        # A low teacher temperature from the start can make training unstable: warm it up linearly
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))

    def forward(self, student_output, teacher_output, epoch, student_norms=None,
                teacher_norms=None):
        """student_output: (ncrops * B, K) logits, teacher_output: (2 * B, K), crop-major."""
        temp = self.teacher_temp_schedule[epoch]
        s = student_output.float() / self.student_temp
        t = teacher_output.float().detach()
        if self.vmf_dim:
            s = s + vmf_log_normalizer(student_norms / self.student_temp, self.vmf_dim)
            t = t / temp + vmf_log_normalizer(teacher_norms.detach() / temp, self.vmf_dim)
            teacher_probs = F.softmax(t - torch.log(self.center), dim=-1)
        else:
            teacher_probs = F.softmax((t - self.center) / temp, dim=-1)  # P_t of Eq. 1
        student_logp = F.log_softmax(s, dim=-1).chunk(self.ncrops)  # ncrops x (B, K)
        teacher_probs = teacher_probs.chunk(2)  # 2 x (B, K)
        total, n_terms = 0.0, 0
        for iq, q in enumerate(teacher_probs):
            for v, logp in enumerate(student_logp):
                if v != iq:  # Eq. 3: never the same view on both sides
                    total = total + torch.sum(-q * logp, dim=-1).mean()
                    n_terms += 1
        self.update_center(F.softmax(t, dim=-1) if self.vmf_dim else teacher_output.float())
        self.teacher_probs = torch.cat(teacher_probs).detach()  # for monitoring: entropy, usage
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_output):
        """Eq. 4, the batch mean over all processes: of logits for DINO, probabilities for vMF."""
        batch_center = teacher_output.sum(dim=0, keepdim=True)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        if self.vmf_dim:  # the floor of the class docstring
            self.center = self.center.clamp_min(torch.finfo(torch.float32).tiny)


# ----------------------------------------------------------------------------------------------
# 4. Training step and loop: schedules, parameter groups, the step, the EMA teacher
# ----------------------------------------------------------------------------------------------
def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     start_warmup_value=0):
    """One value per iteration: linear warm-up, then half a cosine from base_value to final_value"""
    warmup = np.linspace(start_warmup_value, base_value, warmup_epochs * niter_per_ep)
    iters = np.arange(epochs * niter_per_ep - len(warmup))
    half_cosine = 1 + np.cos(np.pi * iters / len(iters))  # from 2 down to 0
    cosine = final_value + 0.5 * (base_value - final_value) * half_cosine
    return np.concatenate((warmup, cosine))


def get_params_groups(model, weight_decay_last_layer=None):
    """No weight decay on biases and norm parameters (1-D tensors), as the official code; with
    weight_decay_last_layer, the prototypes' weights form a third group, whose decay
    train_one_epoch sets each step."""
    regularized, not_regularized, prototypes = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        elif weight_decay_last_layer is not None and "last_layer" in name:
            prototypes.append(param)
        else:
            regularized.append(param)
    groups = [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]
    return groups + ([{"params": prototypes, "weight_decay": weight_decay_last_layer}]
                     if prototypes else [])


def clip_gradients(model, clip):
    """Official DINO clipping: each parameter tensor's gradient separately to norm <= clip."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_((clip / (p.grad.norm() + 1e-6)).clamp(max=1.0))  # a tensor op: no host sync


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """Keep the prototypes fixed during the first epochs: Sec. 3.1 finds it stabilizes training."""
    if epoch < freeze_last_layer:
        for name, p in model.named_parameters():
            if "last_layer" in name:
                p.grad = None


def train_one_epoch(student, teacher, student_without_ddp, dino_loss, loader, optimizer, schedules,
                    epoch, scaler, amp_dtype, args, device, rank):
    lr_schedule, wd_schedule, momentum_schedule, wd_last_schedule = schedules
    student_params = [p.detach() for p in student_without_ddp.parameters()]  # views: see updates
    teacher_params = list(teacher.parameters())
    prototypes = student_without_ddp.head.last_layer
    sums = torch.zeros(3, device=device)  # of loss, KoLeo term, teacher entropy: no sync per step
    usage = torch.zeros(args.out_dim, dtype=torch.long, device=device)
    # A step whose loss is not finite changes nothing. A fused optimizer skips it on the device
    # (found_inf, as GradScaler uses it) and the check is read every 20 steps, with no host sync;
    # with another (the CPU's, where a read waits for nothing) the run stops before the update.
    on_device = bool(optimizer.defaults.get("fused"))
    first_bad = torch.zeros(2, device=device)  # step and value of the first bad loss
    autocast = partial(torch.autocast, device.type, dtype=amp_dtype or torch.float32,
                       enabled=amp_dtype is not None)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0, leave=False)
    for i, (crops, _) in enumerate(bar):
        it = len(loader) * epoch + i  # global step: the schedules are per iteration
        for j, group in enumerate(optimizer.param_groups):
            group["lr"] = float(lr_schedule[it])  # Python floats: numpy scalars do not load safely
            if j == 0:  # the regularized group follows the schedule, the prototypes' group its own
                group["weight_decay"] = float(wd_schedule[it])
            elif j == 2:
                group["weight_decay"] = float(wd_last_schedule[it])
        crops = [c.to(device, non_blocking=True) for c in crops]
        with autocast():
            teacher_output = teacher(crops[:2])  # only the 2 global views go through the teacher
            student_output = student(crops)
            norms = {}
            if args.vmf:
                norms = dict(student_norms=prototypes.weight_g.squeeze(1).abs(),
                             teacher_norms=teacher.head.last_layer.weight_g.squeeze(1).abs())
            center = dino_loss.center
            loss = dino_loss(student_output, teacher_output, epoch, **norms)
            koleo = (koleo_proto.koleo_proto_loss(prototypes.weight) if args.koleo > 0
                     else torch.zeros((), device=device))
            total = loss + args.koleo * koleo
        finite = all_finite(total)
        dino_loss.center = torch.where(finite, dino_loss.center, center)  # nor the centre
        if not on_device and not finite:
            raise diverged(total.item(), epoch, i + 1)
        if on_device:
            new = torch.stack([torch.where(finite, 0.0, i + 1.0), total.detach().float()])
            first_bad = torch.where(first_bad[0] > 0, first_bad, new)  # no copy from the host

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16: scale the loss so small gradients do not underflow
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
        if args.clip_grad:
            clip_gradients(student_without_ddp, args.clip_grad)
        cancel_gradients_last_layer(epoch, student_without_ddp, args.freeze_last_layer)
        if scaler is not None:  # it skips a step whose gradients are not finite
            scaler.step(optimizer)
            scaler.update()
        else:
            if on_device:
                optimizer.found_inf = (~finite).float()  # the fused kernel skips the update where 1
            optimizer.step()

        # The teacher: theta_t <- m theta_t + (1 - m) theta_s (Sec. 3.1). torch._foreach_mul_ and
        # _foreach_add_ do `for t, s in zip(teacher, student): t.mul_(m).add_(s, alpha=1 - m)` in
        # one fused kernel per step instead of two per tensor (what torch.optim's foreach path uses)
        with torch.no_grad():
            m = momentum_schedule[it]
            if on_device:  # a skipped step leaves the teacher as it is
                m = torch.where(finite, m, 1.0)
                torch._foreach_mul_(teacher_params, m)
                torch._foreach_add_(teacher_params, torch._foreach_mul(student_params, 1 - m))
            else:
                torch._foreach_mul_(teacher_params, m)
                torch._foreach_add_(teacher_params, student_params, alpha=1 - m)
            q = dino_loss.teacher_probs
            entropy = -(q * torch.log(q + 1e-12)).sum(dim=-1).mean()
            sums += torch.stack([loss.detach(), koleo.detach(), entropy])
            usage += koleo_proto.assignment_histogram(q)

        if (i + 1) % 20 == 0 or i + 1 == len(loader):  # the only host sync: NaN check, the loss
            loss_sum, bad, value = torch.cat([sums[:1], first_bad]).tolist()
            if bad:
                raise diverged(value, epoch, int(bad))
            bar.set_postfix(loss=f"{loss_sum / (i + 1):.4f}")
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(usage)
        sums /= dist.get_world_size()
    loss_mean, koleo_mean, entropy_mean = (sums / len(loader)).tolist()
    stats = dict(loss=loss_mean, lr=float(lr_schedule[it]), wd=float(wd_schedule[it]),
                 teacher_entropy=entropy_mean)
    if args.koleo > 0:
        stats["koleo_train"] = koleo_mean
    return stats, usage


def all_finite(loss):
    """A device tensor: is the loss finite on every process (no host sync)."""
    finite = torch.isfinite(loss.detach()).float()
    if dist.is_initialized():  # gradients are averaged: one process's NaN would reach all
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite.bool()


def diverged(value, epoch, step):
    return BadInput(f"the loss became {value} at epoch {epoch + 1}, step {step}: training diverged."
                    " Try a lower --lr, a smaller --clip_grad, --precision bf16 or fp32 instead of "
                    "fp16, or a longer --warmup_teacher_temp_epochs; the last checkpoint in "
                    "--output_dir is intact")


def prototype_stats(teacher, student, usage):
    """Collapse figures of the teacher's prototypes (the paper's Sec. 4) and their use on the data,
    and those of the student's (keys ending in _student): the teacher is an EMA of the student,
    so the student's prototypes show a collapse first."""
    stats = koleo_proto.collapse_stats(teacher.head.last_layer.weight.detach())
    stats.update(koleo_proto.collapse_stats(student.head.last_layer.weight.detach(), "_student"))
    stats.update({f"usage_{k}": v for k, v in koleo_proto.usage_stats(usage).items()})
    return stats


# ==============================================================================================
# PLUMBING. A first reading can stop here: the method is all above. What follows makes it a
# program: flags and presets, checks, datasets, checkpoints and resume, DDP set-up, the kNN
# evaluation, logging, main (the epoch loop) and one-line errors.
# ==============================================================================================
class BadInput(Exception):
    """A problem with what the user asked for: reported as one line, no traceback."""


# The official defaults (main_dino.py) are the ImageNet ViT-S/16 recipe. A flag left unset takes
# the preset of --data (or --preset), then these; `python dino.py --help` lists, for each flag,
# the value of the default run `python dino.py` and the official one.
OFFICIAL = dict(
    arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=True, use_bn_in_head=False,
    momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.04,
    warmup_teacher_temp_epochs=0, weight_decay=0.04, weight_decay_end=0.4,
    weight_decay_last_layer=None, clip_grad=3.0, batch_size_per_gpu=64, epochs=100,
    freeze_last_layer=1, lr=0.0005, warmup_epochs=10, min_lr=1e-6, optimizer="adamw",
    drop_path_rate=0.1, global_crops_scale=(0.4, 1.0), local_crops_number=8,
    local_crops_scale=(0.05, 0.4), global_crops_size=224, local_crops_size=96, hidden_dim=2048,
    bottleneck_dim=256, saveckp_freq=20, num_workers=10)

# Small images need small crops: a 28 px Fashion-MNIST image upsampled to 224 px costs 64x the
# compute and adds no information. Global crops keep the native size, local crops are about half
# of it (96/224 in the official recipe), and the patch size shrinks with the image. The default
# run must finish in minutes on 2 CPU cores: a 6-block ViT on a 4 x 4 grid of 7 px patches, 1024
# prototypes, a head 4x narrower than the official one (a 128-d backbone needs no 2048-wide MLP;
# it saves a quarter of the step), small batches, 2 local crops, a sharper and faster teacher,
# and no frozen prototypes: 5 epochs in 9 to 11 minutes that lift the teacher's kNN by 6 points
# (docs/benchmarks.md has the trials behind each value).
SMALL_IMAGES = dict(patch_size=4, drop_path_rate=0.0, warmup_epochs=2, min_lr=1e-5, saveckp_freq=5)
PRESETS = {
    "imagenet": {},
    "folder": {},
    "fashion-mnist": dict(SMALL_IMAGES, arch="vit_nano", patch_size=7, out_dim=1024,
                          hidden_dim=512, epochs=5, warmup_epochs=1, batch_size_per_gpu=32,
                          lr=0.004, min_lr=1e-4, momentum_teacher=0.98, teacher_temp=0.02,
                          warmup_teacher_temp=0.02, freeze_last_layer=0, local_crops_number=2,
                          global_crops_size=28, local_crops_size=14,
                          global_crops_scale=(0.5, 1.0), local_crops_scale=(0.15, 0.5),
                          saveckp_freq=1, num_workers=2),
    "fashion-mnist-full": dict(SMALL_IMAGES, arch="vit_tiny", out_dim=4096, epochs=100, lr=0.001,
                               global_crops_size=28, local_crops_size=12,
                               global_crops_scale=(0.5, 1.0), local_crops_scale=(0.15, 0.5),
                               num_workers=4),
    "cifar10": dict(SMALL_IMAGES, arch="vit_small", out_dim=8192, epochs=200, lr=0.001,
                    global_crops_size=32, local_crops_size=16, global_crops_scale=(0.3, 1.0),
                    local_crops_scale=(0.1, 0.4), num_workers=8),
}
PRESETS["cifar100"] = PRESETS["cifar10"]
DEFAULT_RUN = {**OFFICIAL, **PRESETS["fashion-mnist"]}  # what `python dino.py` trains with

# name: (mean, std) of the pixels, used to normalize them.
DATASETS = {
    "fashion-mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "fashion-mnist-full": ((0.2860,) * 3, (0.3530,) * 3),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def bool_flag(s):
    if s.lower() in ("true", "1", "yes", "on"):
        return True
    if s.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage first; one line is enough
        sys.exit(f"{self.prog}: error: {message} (see python {self.prog} --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # preset flags say their defaults themselves
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineHelp(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """One line of at most 100 characters per flag; the epilog keeps its own line breaks."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=100)


def show(value):  # a default as it is typed on the command line
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def get_args_parser():
    presets = "\n".join(textwrap.fill(f"{k}: " + (" ".join(f"{n}={show(v)}" for n, v in d.items())
                                                  or "the official values"), 98,
                                      initial_indent="  ", subsequent_indent="    ")
                        for k, d in PRESETS.items())
    p = OneLineParser(
        "dino.py", usage="python dino.py [--flag VALUE ...]", formatter_class=OneLineHelp,
        description="DINO / DINO-vMF with KoLeo-Proto. [X; official Y]: X is what `python dino.py`"
                    " uses, Y main_dino.py's\nvalue where it differs; another --data or --preset "
                    "changes X (see the end).",
        epilog=f"--arch: {', '.join(ARCHS)}\n--data, --preset: {', '.join(PRESETS)}\n--precision "
               "auto: bf16 on a GPU that has it, else fp32 (replaces the official --use_fp16)\n"
               f"presets (over the official values):\n{presets}")

    def preset(name, metavar, help, **kw):  # a flag whose default comes from the preset
        ours, official = show(DEFAULT_RUN[name]), show(OFFICIAL[name])
        default = ours if ours == official else f"{ours}; official {official}"
        p.add_argument(f"--{name}", metavar=metavar, help=f"{help} [{default}]", **kw)

    preset("arch", "NAME", "backbone (names at the end)", choices=list(ARCHS))
    preset("patch_size", "PX", "ViT patch side", type=int)
    preset("out_dim", "K", "prototypes: rows of the head's last layer", type=int)
    preset("hidden_dim", "D", "width of the head's hidden layers", type=int)
    preset("bottleneck_dim", "D", "L2-normalized bottleneck the prototypes live in", type=int)
    preset("norm_last_layer", "BOOL", "unit-norm prototypes, weight_g frozen (--vmf: false)",
           type=bool_flag)
    preset("use_bn_in_head", "BOOL", "BatchNorm in the head's MLP", type=bool_flag)
    preset("momentum_teacher", "M", "teacher EMA momentum, cosine to 1", type=float)
    preset("warmup_teacher_temp", "T", "teacher temperature at the start of warm-up", type=float)
    preset("teacher_temp", "T", "teacher temperature after warm-up (sharpens)", type=float)
    preset("warmup_teacher_temp_epochs", "N", "epochs of linear teacher temperature warm-up",
           type=int)
    preset("weight_decay", "WD", "initial weight decay, cosine to --weight_decay_end", type=float)
    preset("weight_decay_end", "WD", "final weight decay", type=float)
    # the prototypes' own cosine from --weight_decay to WD; None: the schedule above, as official
    preset("weight_decay_last_layer", "WD", "own final decay of the prototypes (None: as the rest)",
           type=float)
    preset("clip_grad", "C", "max gradient norm per parameter tensor (0 = off)", type=float)
    preset("batch_size_per_gpu", "N", "images per process and step", type=int)
    preset("epochs", "N", "training epochs", type=int)
    preset("freeze_last_layer", "N", "epochs during which the prototypes get no update", type=int)
    preset("lr", "LR", "peak lr per 256 images of the total batch", type=float)
    preset("warmup_epochs", "N", "epochs of linear lr warm-up", type=int)
    preset("min_lr", "LR", "lr at the end of the cosine schedule", type=float)
    preset("optimizer", "NAME", "adamw or sgd", choices=["adamw", "sgd"])
    preset("drop_path_rate", "P", "stochastic depth rate of the student", type=float)
    preset("global_crops_scale", ("MIN", "MAX"), "area range of the 2 global crops", type=float,
           nargs=2)
    preset("local_crops_number", "N", "local crops per image (0 = no multi-crop)", type=int)
    preset("local_crops_scale", ("MIN", "MAX"), "area range of the local crops", type=float,
           nargs=2)
    preset("global_crops_size", "PX", "side of the global crops", type=int)
    preset("local_crops_size", "PX", "side of the local crops", type=int)
    preset("saveckp_freq", "N", "also keep checkpointNNNN.pth every N epochs", type=int)
    preset("num_workers", "N", "data-loading processes per training process", type=int)
    add = p.add_argument
    add("--data", default="fashion-mnist", metavar="NAME", choices=list(DATASETS), help="dataset")
    add("--data_path", metavar="DIR", help="dataset folder (imagenet/folder: train/ and val/)")
    add("--preset", metavar="NAME", choices=list(PRESETS), help="preset (default: that of --data)")
    add("--long_tail", type=float, metavar="RHO", help="subsample classes to an exponential "
        "profile, largest/smallest RHO")
    add("--koleo", type=float, default=0.0, metavar="LAMBDA", help="KoLeo-Proto weight (0 = off)")
    add("--vmf", action="store_true", help="DINO-vMF: vMF normalizer, probability centring")
    add("--precision", default="auto", metavar="P", choices=["auto", "bf16", "fp16", "fp32"],
        help="autocast dtype: auto, bf16, fp16, fp32")
    add("--compile", nargs="?", const="inductor", metavar="BACKEND",
        help="torch.compile both networks (alone: inductor; default: off)")
    add("--output_dir", metavar="DIR", help="checkpoints and logs (default: runs/dino-<preset>)")
    add("--resume", metavar="PATH", help="checkpoint to continue (default: --output_dir's)")
    add("--init", metavar="PATH", help="new run from a checkpoint's teacher (fresh optimizer)")
    add("--subset", type=int, metavar="N", help="N training and N test images, class shares kept")
    add("--seed", type=int, default=0, metavar="N", help="random seed")
    add("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by old launchers
    return p


def parse_args(argv=None):
    args = get_args_parser().parse_args(argv)
    preset = PRESETS.get(args.preset or args.data, {})
    unset = [name for name in OFFICIAL if getattr(args, name) is None]
    for name in unset:
        setattr(args, name, preset.get(name, OFFICIAL[name]))
    for name in ("warmup_epochs", "warmup_teacher_temp_epochs"):  # a warm-up not asked for fits
        if name in unset and getattr(args, name) > args.epochs:
            if os.environ.get("RANK", "0") == "0":
                print(f"--{name} {getattr(args, name)} of the preset shortened to --epochs "
                      f"{args.epochs}")
            setattr(args, name, args.epochs)
    if args.vmf:
        args.norm_last_layer = False  # vMF components need free norms: kappa_k = ||w_k|| / tau
    args.output_dir = args.output_dir or os.path.join("runs", f"dino-{args.preset or args.data}")
    check_args(args)
    return args


def check_args(args):
    a = args
    warmup = "must lie in [0, --epochs {}]".format(a.epochs)
    problems = [
        (a.out_dim < 2, f"--out_dim {a.out_dim}: DINO needs at least 2 prototypes"),
        (a.bottleneck_dim < 2, "--bottleneck_dim must be at least 2"),
        (a.hidden_dim < 1, "--hidden_dim must be at least 1"),
        (a.batch_size_per_gpu < 1, f"--batch_size_per_gpu {a.batch_size_per_gpu}: must be >= 1"),
        (a.use_bn_in_head and a.batch_size_per_gpu < 2,
         "--use_bn_in_head needs --batch_size_per_gpu >= 2"),
        (a.epochs < 1, "--epochs must be at least 1"),
        (not 0 <= a.warmup_epochs <= a.epochs, f"--warmup_epochs {a.warmup_epochs} {warmup}"),
        (a.local_crops_number < 0, "--local_crops_number cannot be negative"),
        (not 0 <= a.warmup_teacher_temp_epochs <= a.epochs,
         f"--warmup_teacher_temp_epochs {a.warmup_teacher_temp_epochs} {warmup}"),
        (min(a.teacher_temp, a.warmup_teacher_temp) <= 0, "teacher temperatures must be positive"),
        (a.long_tail is not None and a.long_tail < 1,
         "--long_tail RHO must be >= 1 (RHO = largest / smallest class)"),
        (a.koleo < 0, "--koleo must be >= 0"),
        (a.subset is not None and a.subset < 1, "--subset must be at least 1"),
    ]
    for flag in ("global_crops_size", "local_crops_size"):
        size = getattr(a, flag)
        problems.append((a.arch.startswith("vit") and (size < a.patch_size or size % a.patch_size),
                         f"--{flag} {size} is not a multiple of --patch_size {a.patch_size}"))
    for bad, message in problems:
        if bad:
            raise BadInput(message)


# ---- datasets: each split of --data with .targets, one int label per image
def read_idx(path):
    """Read an IDX file (the MNIST format), gzipped or not, into a uint8 array."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class ArrayDataset(torch.utils.data.Dataset):
    """Grey images held in memory as a uint8 array (N, H, W)."""

    def __init__(self, images, targets, transform):
        self.images, self.targets, self.transform = images, [int(t) for t in targets], transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i]).convert("RGB")), self.targets[i]


def pil_loader(path):
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read image {path} ({e.__class__.__name__}): remove or replace it"
                       ) from None


def fashion_mnist(folder, train, transform):
    split = "train" if train else "t10k"
    files = [os.path.join(folder, f"{split}-{kind}-ubyte.gz") for kind in ("images-idx3",
                                                                            "labels-idx1")]
    files = [f if os.path.exists(f) else f[:-3] for f in files]  # gzipped or not
    if not all(os.path.exists(f) for f in files):
        raise BadInput(f"no Fashion-MNIST files ({split}-images-idx3-ubyte[.gz]) in {folder}: "
                       "pass the folder that holds them with --data_path")
    return ArrayDataset(read_idx(files[0]), read_idx(files[1]), transform)


def image_folder(root, transform):
    if not os.path.isdir(root):
        raise BadInput(f"{root} is not a folder: --data_path needs train/ and val/ with one "
                       "subfolder per class")
    try:
        return datasets.ImageFolder(root, transform, loader=pil_loader)
    except (FileNotFoundError, RuntimeError) as e:
        raise BadInput(f"no images in {root} ({e}): expected one subfolder of images per class"
                       ) from None


def build_dataset(args, train, transform):
    """The train or test split of --data (None: a folder without val/)."""
    name, path = args.data, args.data_path
    if name == "fashion-mnist":
        return fashion_mnist(path or os.path.join(HERE, "data", "fashion-mnist-sample"), train,
                             transform)
    if name == "fashion-mnist-full":
        debian = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
        if path is None and os.path.isdir(debian):
            return fashion_mnist(debian, train, transform)
        ds = datasets.FashionMNIST(path or "data", train=train, download=True)
        return ArrayDataset(ds.data.numpy(), ds.targets.tolist(), transform)
    if name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        return cls(path or "data", train=train, transform=transform, download=True)
    if path is None:
        raise BadInput(f"--data {name} needs --data_path (a folder with train/ and val/, one "
                       "subfolder per class)")
    if name == "folder" and not os.path.isdir(os.path.join(path, "train")):
        return image_folder(path, transform) if train else None  # a single tree: train only
    return image_folder(os.path.join(path, "train" if train else "val"), transform)


def long_tail_indices(targets, rho, seed):
    """Exponential class profile of CIFAR-10-LT (Cao et al., 2019): the i-th class keeps
    n_max * rho^(-i / (C - 1)) images, so the largest class has rho times the smallest."""
    targets = np.asarray(targets)
    classes, counts = np.unique(targets, return_counts=True)
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(targets == c),
                       max(1, int(counts.min() * rho ** (-i / max(1, len(classes) - 1)))),
                       replace=False) for i, c in enumerate(classes)]
    return np.sort(np.concatenate(keep))


def balanced_subset(indices, targets, n, seed):
    """n of the indices drawn at random (seeded), each class keeping its share of them (largest
    remainder): the first n would be a few classes of a folder tree, which is sorted by class."""
    indices = np.asarray(indices)
    if n is None or n >= len(indices):
        return indices
    labels = np.asarray(targets)[indices]
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(indices)
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota, kind="stable")[:n - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    keep = [rng.choice(indices[labels == c], k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(keep))


def training_indices(args, targets):
    """Which training images are used: --long_tail subsampling, then --subset."""
    indices = np.arange(len(targets))
    if args.long_tail:
        indices = long_tail_indices(targets, args.long_tail, args.seed)
    return balanced_subset(indices, targets, args.subset, args.seed)


# ---- checkpoints: written atomically, loaded with weights_only, checked against the flags
def save_checkpoint(state, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # e.g. the disk filled up during the run
        if os.path.exists(tmp):
            os.remove(tmp)
        raise BadInput(f"cannot write {path} ({e.strerror or e}): free space there and rerun; "
                       "the previous checkpoint is intact") from None


def check_output_dir(path, checkpoint_bytes):
    """Fail before the first step, not after an epoch, where no checkpoint can be written."""
    probe = os.path.join(path, ".write_test")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(4096))
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
        free = shutil.disk_usage(path).free
    except OSError as e:
        raise BadInput(f"cannot write to --output_dir {path} ({e.strerror or e}): "
                       "pass a writable folder") from None
    if free < checkpoint_bytes:
        raise BadInput(f"--output_dir {path} has {free / 2**20:.0f} MB free, a checkpoint needs "
                       f"~{checkpoint_bytes / 2**20:.0f} MB: free space or pass another folder")


def safe_load(path):
    """torch.load with weights_only=True (a pickle cannot run code); argparse.Namespace is allowed
    because the official checkpoints store their arguments as one."""
    if not os.path.isfile(path):
        raise BadInput(f"no checkpoint at {path}")
    with warnings.catch_warnings(record=True) as caught:  # held back: a failed load is one line
        warnings.simplefilter("always")
        try:
            if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.4
                with torch.serialization.safe_globals([argparse.Namespace]):
                    ckpt = torch.load(path, map_location="cpu", weights_only=True)
            else:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise BadInput(f"{path} is not a checkpoint torch can load safely "
                           f"({e.__class__.__name__}): pass a .pth written by dino.py or the "
                           "official DINO") from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ckpt


def load_checkpoint(path):
    """A training checkpoint: a dict with at least 'teacher' (the official layout)."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or "teacher" not in ckpt:
        raise BadInput(f"{path} holds no 'teacher' entry: not a DINO training checkpoint")
    saved = ckpt.get("args")  # written before --hidden_dim existed (ours or official): 2048 wide
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    if isinstance(saved, dict):
        saved.setdefault("hidden_dim", OFFICIAL["hidden_dim"])
    return ckpt


def strip_prefix(state_dict, prefix="module."):
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def restore(ckpt, path, args, student, teacher, optimizer, dino_loss, scaler):
    """Load a training checkpoint; a different architecture is one clear line, not a key dump."""
    saved = ckpt.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else (saved or {})
    # every flag that shapes the weights (or, where its state is loaded, the optimizer's groups)
    shapes = ("arch", "patch_size", "global_crops_size", "out_dim", "hidden_dim", "bottleneck_dim",
              "use_bn_in_head", "vmf", "norm_last_layer")
    for key in shapes + (("optimizer", "weight_decay_last_layer") if "optimizer" in ckpt else ()):
        if key in saved and saved[key] != getattr(args, key):
            raise BadInput(f"{path} was trained with --{key} {saved[key]}, this run has "
                           f"{getattr(args, key)}: pass the same --{key} or use another "
                           "--output_dir")
    try:
        student.load_state_dict(strip_prefix(ckpt["student"]))
        teacher.load_state_dict(strip_prefix(ckpt["teacher"]))
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise BadInput(f"{path} does not fit this model ({first[:200]}): check "
                       "--arch/--patch_size/--out_dim") from None
    if "dino_loss" in ckpt:
        dino_loss.load_state_dict(ckpt["dino_loss"])
    if scaler is not None and "fp16_scaler" in ckpt:
        scaler.load_state_dict(ckpt["fp16_scaler"])
    return int(ckpt.get("epoch", 0)), float(ckpt.get("seconds", 0.0))


# ---- distributed set-up
def init_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process. Under
    torchrun a single process takes the DDP path too (a one-process group), so that it tests it."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# ---- evaluation: weighted kNN on L2-normalized teacher features (Wu et al., 2018; DINO's protocol)
@torch.no_grad()
def knn_predict(train_features, train_labels, test_features, k=20, T=0.07, num_classes=None):
    """(N, min(5, C)) most voted classes of each test sample, best first. Each test sample takes its
    k most cosine-similar training samples; each votes for its class with weight exp(similarity/T).
    Features must be L2-normalized. Chunked over test samples: the similarities stay < ~256 MB."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_labels))
    chunk = max(1, 2**26 // len(train_labels))
    top = []
    for feats in test_features.split(chunk):
        sims, idx = (feats @ train_features.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(feats), num_classes, device=feats.device)
        votes.scatter_add_(1, train_labels[idx], (sims / T).exp())  # (b, C)
        top.append(votes.topk(min(5, num_classes), dim=1).indices)
    return torch.cat(top)


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k=20, T=0.07,
                   num_classes=None):
    """Top-1 and top-5 accuracy (percent) of knn_predict, for any number of test samples."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    predicted = knn_predict(train_features, train_labels, test_features, k, T, num_classes)
    hits, n = predicted == test_labels[:, None], len(test_labels)
    return 100.0 * hits[:, 0].sum().item() / n, 100.0 * hits.any(dim=1).sum().item() / n


@torch.no_grad()
def extract_features(model, dataset, args, device, amp_dtype, with_pixels=True):
    """Features model(x) (B, D) of a dataset, in fp32, and its L2-normalized raw pixels (pooled to
    at most 32 x 32). With several processes each takes every world-th image, then all gather."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(shard, batch_size=256, num_workers=args.num_workers)
    feats, pixels = [], []
    for x, _ in tqdm(loader, desc="features", disable=rank != 0, leave=False):
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            feats.append(model(x).float())
        if with_pixels:
            pooled = F.adaptive_avg_pool2d(x, (min(32, x.shape[-2]), min(32, x.shape[-1])))
            pixels.append(F.normalize(pooled.flatten(1), dim=1))
    out = [torch.cat(feats)] + ([torch.cat(pixels)] if with_pixels else [])
    if world > 1:  # shards differ by at most one image: pad, gather, interleave back
        n = math.ceil(len(dataset) / world)
        for i, t in enumerate(out):
            padded = torch.cat([t, t.new_zeros(n - len(t), t.shape[1])])
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded)
            out[i] = torch.stack(parts, dim=1).reshape(n * world, -1)[:len(dataset)]
    return out


def evaluate(args, teacher, eval_sets, indices, device, amp_dtype, pixels=True):
    """kNN top-1/top-5 (k=20, T=0.07) of the teacher's CLS features, and of raw pixels."""
    train_eval, test_eval = eval_sets
    if test_eval is None:
        return dict(knn_top1=None, knn_top5=None, raw_pixel_knn_top1=None)
    was_training = teacher.training
    teacher.eval()
    test_indices = balanced_subset(range(len(test_eval)), test_eval.targets, args.subset, args.seed)
    pixels = pixels and len(indices) <= 200_000  # raw pixels of ImageNet would not fit in memory
    train_feats, *train_pixels = extract_features(teacher.backbone, torch.utils.data.Subset(
        train_eval, indices), args, device, amp_dtype, pixels)
    test_feats, *test_pixels = extract_features(teacher.backbone, torch.utils.data.Subset(
        test_eval, test_indices), args, device, amp_dtype, pixels)
    teacher.train(was_training)
    train_labels = torch.as_tensor(np.asarray(train_eval.targets)[indices], device=device)
    test_labels = torch.as_tensor(np.asarray(test_eval.targets)[test_indices], device=device)
    knn = partial(knn_classifier, k=20, T=0.07,
                  num_classes=int(max(train_labels.max(), test_labels.max())) + 1)
    top1, top5 = knn(F.normalize(train_feats, dim=1), train_labels,
                     F.normalize(test_feats, dim=1), test_labels)
    raw1 = knn(*train_pixels, train_labels, *test_pixels, test_labels)[0] if pixels else None
    return dict(knn_top1=top1, knn_top5=top5, raw_pixel_knn_top1=raw1)


# ---- main: data, models, resume, the epoch loop, the summary
def build_loader(args, train_set, indices, world, device, say):
    n_batches = len(indices) // (args.batch_size_per_gpu * world)
    if n_batches == 0:
        raise BadInput(f"--batch_size_per_gpu {args.batch_size_per_gpu} x {world} processes "
                       f"exceeds the {len(indices)} training images: lower it")
    counts = np.bincount(np.asarray(train_set.targets)[indices])
    say(f"data: {args.data}, {len(indices)} training images, {len(counts)} classes"
        + (f" (--subset: drawn with --seed {args.seed}, class shares kept)" if args.subset else "")
        + (f", long-tailed RHO={args.long_tail}: largest class {counts.max()}, smallest "
           f"{counts.min()}" if args.long_tail else ""))
    subset = torch.utils.data.Subset(train_set, indices)
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(subset, shuffle=True,
                                                                  seed=args.seed, drop_last=True)
    else:
        sampler = torch.utils.data.RandomSampler(subset, generator=torch.Generator())
    # the generator seeds the workers' augmentations; main resets it every epoch
    return torch.utils.data.DataLoader(subset, sampler=sampler, batch_size=args.batch_size_per_gpu,
                                       num_workers=args.num_workers, drop_last=True,
                                       pin_memory=device.type == "cuda",
                                       generator=torch.Generator())


def prepare_models(args, device, world, say):
    """Student and teacher on the device: synced BatchNorm, torch.compile, DDP, as asked."""
    student, teacher = (m.to(device) for m in build_models(args))
    if world > 1 and device.type == "cuda":  # BatchNorm (ResNet, --use_bn_in_head): global batch
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    if args.compile and not torch._dynamo.is_dynamo_supported():
        say(f"--compile: no torch.compile with torch {torch.__version__} on Python "
            f"{sys.version.split()[0]}: training uncompiled")
    elif args.compile:  # in place, so that state dicts keep their keys (no _orig_mod. prefix)
        try:
            student.compile(backend=args.compile), teacher.compile(backend=args.compile)
        except Exception as e:  # an unknown backend fails here, before any compiling
            raise BadInput(f"--compile {args.compile}: {str(e).splitlines()[0]}") from None
    student_without_ddp = student
    if dist.is_initialized():
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    teacher.load_state_dict(student_without_ddp.state_dict())  # the teacher starts as the student
    for p in teacher.parameters():
        p.requires_grad = False  # no backpropagation through the teacher
    say(f"model: {args.arch}, {sum(p.numel() for p in student_without_ddp.parameters()) / 1e6:.1f}M"
        f" parameters, {args.out_dim} prototypes" + (", DINO-vMF" if args.vmf else "")
        + (f", KoLeo-Proto lambda={args.koleo}" if args.koleo else ""))
    return student, teacher, student_without_ddp


def continue_log(log_path, resume, start_epoch):
    """A run continued in a new output_dir keeps its checkpoint's history, in the log and plot."""
    old_log = os.path.join(os.path.dirname(resume or ""), "log.txt")
    if resume and not os.path.exists(log_path) and os.path.isfile(old_log):
        with open(old_log) as f:
            history = [line for line in f
                       if line.strip() and json.loads(line)["epoch"] <= start_epoch]
        with open(log_path, "w") as f:
            f.writelines(history)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}.get(args.precision)
    if args.precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        amp_dtype = torch.bfloat16 if bf16 else None
    seed_everything(args.seed)

    mean, std = DATASETS[args.data]
    augment = DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale,
                                   args.local_crops_number, args.global_crops_size,
                                   args.local_crops_size, mean, std)
    train_set = build_dataset(args, True, augment)
    indices = training_indices(args, train_set.targets)
    loader = build_loader(args, train_set, indices, world, device, say)
    student, teacher, student_without_ddp = prepare_models(args, device, world, say)
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp,
                         args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs,
                         vmf_dim=args.bottleneck_dim if args.vmf else None).to(device)
    params = get_params_groups(student_without_ddp, args.weight_decay_last_layer)
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, fused=device.type == "cuda")
    else:
        optimizer = torch.optim.SGD(params, lr=0, momentum=0.9, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    # schedules per iteration, the lr scaled linearly with the total batch (Goyal et al., 2017)
    total_batch, n = args.batch_size_per_gpu * world, len(loader)
    schedules = (cosine_scheduler(args.lr * total_batch / 256, args.min_lr, args.epochs, n,
                                  args.warmup_epochs),
                 cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, n),
                 cosine_scheduler(args.momentum_teacher, 1, args.epochs, n),
                 None if args.weight_decay_last_layer is None else  # the prototypes' own decay
                 cosine_scheduler(args.weight_decay, args.weight_decay_last_layer, args.epochs, n))

    # resume: an explicit --resume, else the run already in output_dir (nothing is overwritten)
    start_epoch, seconds, knn_init = 0, 0.0, None
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    resume = args.resume or (ckpt_path if os.path.isfile(ckpt_path) else None)
    if resume:
        ckpt = load_checkpoint(resume)
        start_epoch, seconds = restore(ckpt, resume, args, student_without_ddp, teacher, optimizer,
                                       dino_loss, scaler)
        knn_init = ckpt.get("knn_top1_init")
        say(f"resumed from {resume} at epoch {start_epoch}")
    elif args.init:  # a new run from another run's teacher: its weights in both networks and its
        init = load_checkpoint(args.init)  # centre; the optimizer and the schedules start afresh
        if not any(k.startswith(("head.mlp", "module.head.mlp")) for k in init["teacher"]):
            raise BadInput(f"{args.init} does not fit this model: it holds no head MLP (a copy "
                           "for audits); --init needs the whole teacher (slim_checkpoint.py "
                           "--whole_teacher)")
        restore({**{k: init[k] for k in ("args", "dino_loss") if k in init},
                 "student": init["teacher"], "teacher": init["teacher"]}, args.init, args,
                student_without_ddp, teacher, optimizer, dino_loss, None)
        say(f"student and teacher start from the teacher of {args.init}")
    log_path = os.path.join(args.output_dir, "log.txt")
    if rank == 0:  # room for student, teacher and AdamW's two moments: four copies of the weights
        check_output_dir(args.output_dir, 4 * sum(p.numel() * p.element_size()
                                                  for p in student_without_ddp.parameters()))
        continue_log(log_path, resume, start_epoch)
    transform = eval_transform(args, mean, std)
    eval_sets = build_dataset(args, True, transform), build_dataset(args, False, transform)
    if not resume:  # the baseline the training must beat: kNN of the teacher before training
        knn_init = evaluate(args, teacher, eval_sets, indices, device, amp_dtype,
                            pixels=False)["knn_top1"]
        if knn_init is not None:
            say(f"kNN top-1 of the {'starting' if args.init else 'untrained'} teacher: "
                f"{knn_init:.2f}%")

    for epoch in range(start_epoch, args.epochs):
        # Reseeding from (seed, epoch, rank) makes a resumed run draw the same crops and drop paths
        seed_everything(args.seed + 1000 * epoch + rank)
        loader.generator.manual_seed(args.seed + 1000 * epoch + rank)
        if world > 1:
            loader.sampler.set_epoch(epoch)
        else:
            loader.sampler.generator.manual_seed(args.seed + epoch)
        t0 = time.time()
        stats, usage = train_one_epoch(student, teacher, student_without_ddp, dino_loss, loader,
                                       optimizer, schedules, epoch, scaler, amp_dtype, args,
                                       device, rank)
        elapsed = time.time() - t0
        seconds += elapsed
        if rank == 0:
            stats = dict(epoch=epoch + 1, **stats, **prototype_stats(teacher, student_without_ddp,
                                                                     usage),
                         images_per_s=n * total_batch / elapsed, seconds=seconds)
            student_state = student_without_ddp.state_dict()
            state = {"student": {"module." + k: v for k, v in student_state.items()},
                     "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(),
                     "epoch": epoch + 1, "args": args, "dino_loss": dino_loss.state_dict(),
                     "seconds": seconds, "knn_top1_init": knn_init}
            if scaler is not None:
                state["fp16_scaler"] = scaler.state_dict()
            save_checkpoint(state, ckpt_path)
            if args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0:
                save_checkpoint(state, os.path.join(args.output_dir,
                                                    f"checkpoint{epoch + 1:04}.pth"))
            with open(log_path, "a") as f:
                f.write(json.dumps(stats) + "\n")
            with open(log_path) as f:  # the whole run, resumed parts included
                koleo_proto.plot_training([json.loads(line) for line in f], args.out_dim,
                                          os.path.join(args.output_dir, "unique_prototypes.png"),
                                          f"dino.py --data {args.data}"
                                          + (f" --koleo {args.koleo}" if args.koleo else ""))
            say(f"epoch {epoch + 1}/{args.epochs}  loss {stats['loss']:.4f}  unique prototypes "
                f"{stats['unique_prototypes']}/{args.out_dim} (student "
                f"{stats['unique_prototypes_student']})  used {stats['usage_used']}  teacher "
                f"entropy {stats['teacher_entropy']:.2f}  {stats['images_per_s']:.0f} img/s")

    # evaluation: kNN on teacher CLS features, raw-pixel kNN on the same split, collapse
    summary = evaluate(args, teacher, eval_sets, indices, device, amp_dtype)
    top1, top5, raw1 = summary["knn_top1"], summary["knn_top5"], summary["raw_pixel_knn_top1"]
    if top1 is None:
        say("kNN: skipped (no val/ split under --data_path)")
    else:
        say(f"kNN top-1 (k=20, T=0.07, teacher CLS): {top1:.2f}%  (top-5 {top5:.2f}%)")
        say("raw-pixel kNN top-1 on the same split: "
            + ("skipped (over 200k images)" if raw1 is None else f"{raw1:.2f}%"))
        say("kNN top-1: init " + ("unknown" if knn_init is None else f"{knn_init:.2f}%")
            + f" -> trained {top1:.2f}%")
    if rank == 0:
        unique = koleo_proto.count_unique_prototypes(teacher.head.last_layer.weight.detach(),
                                                     eps=0.025)
        summary.update(knn_top1_init=knn_init, unique_prototypes=unique,
                       num_prototypes=args.out_dim,
                       unique_prototypes_student=koleo_proto.count_unique_prototypes(
                           student_without_ddp.head.last_layer.weight.detach(), eps=0.025),
                       unique_percent=100.0 * unique / args.out_dim, seconds=seconds,
                       train_images=len(indices), args=vars(args))
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
        say(f"unique prototypes (eps 0.025): {unique} / {args.out_dim} "
            f"({summary['unique_percent']:.1f}%)")
        say(f"training time: {datetime.timedelta(seconds=round(seconds))}; summary in "
            f"{os.path.join(args.output_dir, 'summary.json')}")
    if dist.is_initialized():
        dist.destroy_process_group()


def run(entry=main, prog="dino.py"):
    """Run entry(); bad input ends the program with one line and a non-zero status, no traceback."""
    try:
        entry()
    except BadInput as e:  # raised in a data-loading worker, it arrives wrapped with a traceback
        message = str(e).strip().splitlines()[-1].split("BadInput: ", 1)[-1]
        sys.exit(f"{prog}: error: {message}")
    except KeyboardInterrupt:
        sys.exit(f"{prog}: interrupted (a training run continues from its last checkpoint when "
                 "rerun)")


if __name__ == "__main__":
    run()
