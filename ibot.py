"""iBOT, image BERT pre-training with an online tokenizer (Zhou et al., ICLR 2022), in one file.

The method. A student network and a teacher of the same architecture (a ViT, then a head that
maps each token onto K prototypes) see crops of one image; P(x) is the softmax of the head's
logits. The teacher gets no gradient: it is an exponential moving average of the student,
    theta_t <- m theta_t + (1 - m) theta_s,  m rising from 0.996 to 1 on a cosine.
Its outputs are centred and sharpened, as in DINO (Caron et al., 2021), which keeps them from
collapsing onto one prototype (centring) or onto the uniform distribution (sharpening):
    P_t(x) = softmax((g_t(x) - c) / tau_t),  c <- 0.9 c + 0.1 mean over the batch of g_t(x),
while the student's P_s(x) = softmax(g_s(x) / 0.1). iBOT's loss has two terms (Sec. 3.2):
    L_[CLS] = -sum_{u global} sum_{v != u} P_t^[CLS](u) . log P_s^[CLS](v)
              (DINO's self-distillation of the [CLS] token across views, local crops included);
    L_MIM   = -sum_{u global} mean_{i: m_i = 1} P_t^patch(u)_i . log P_s^patch(u_masked)_i
              (masked image modelling: the student sees global view u with a block mask m, the
              masked patch embeddings replaced by a learned token; for each masked patch i it
              predicts the teacher's distribution on the whole view, the "online tokenizer");
    L = lambda1 L_[CLS] + lambda2 L_MIM, each term averaged over its pairs of views.
Each term has its own centre and teacher temperature; the patch prototypes are those of the
[CLS] token when the head is shared (the recipe of the iBOT README).
With the two changes the partial-prototype-collapse paper studies (Govindarajan et al., BMVC 2024):
  --koleo LAMBDA  KoLeo-Proto: adds LAMBDA * (-(1/K) sum_k log min_j ||w_k - w_j||) on the
                  L2-normalized prototypes w_k of each distinct last layer;
  --vmf           iBOT-vMF (Govindarajan et al., ICLR 2023): prototypes as von Mises-Fisher
                  components (free norms, a normalizer in each logit, centring of probabilities).

Reading order: 1. the model, 2. the crops and block masks, 3. the loss, 4. the training step,
5. the training loop (main), then a divider. Datasets, checkpoints, DDP, kNN: in koleo_proto.py.
Runs:
  python ibot.py                                    # bundled Fashion-MNIST sample, CPU, minutes
  python ibot.py --koleo 0.1 --vmf                  # iBOT-vMF with KoLeo-Proto (the paper's method)
  torchrun --nproc_per_node 8 ibot.py --data imagenet --data_path /imagenet   # official ViT-S/16
Names (VisionTransformer, iBOTHead, MultiCropWrapper, iBOTLoss), flags, defaults and checkpoint
keys are those of bytedance/ibot, so official checkpoints load here and ours load there.
"""
import argparse
import math
import random
import time
from collections import OrderedDict
from functools import partial
from itertools import groupby

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import ImageFilter
from torchvision import transforms
from torchvision.ops import StochasticDepth
from tqdm import tqdm

import koleo_proto

BadInput = koleo_proto.BadInput  # a bad flag or file: one line, no traceback (koleo_proto.run)

# ==== 1. The model: ViT with a mask token (official key names), iBOTHead, MultiCropWrapper =====
class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, dim * 3, bias=qkv_bias), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, heads, N, C / heads)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, C / heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop_path, norm_layer):
        super().__init__()
        self.norm1, self.attn = norm_layer(dim), Attention(dim, num_heads, qkv_bias)
        self.drop_path = StochasticDepth(drop_path, "row")  # per sample (Huang et al., 2016)
        hidden = int(dim * mlp_ratio)
        self.norm2, self.mlp = norm_layer(dim), nn.Sequential(OrderedDict(
            fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))

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
    """ViT (Dosovitskiy et al., 2021) as in the official iBOT code: DINO's, plus a learned mask
    token (masked_embed) that replaces the masked patch embeddings of the student's global crops."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), return_all_tokens=False,
                 masked_im_modeling=False):
        super().__init__()
        self.embed_dim, self.return_all_tokens = embed_dim, return_all_tokens
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # deeper blocks dropped more
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r, norm_layer)
                                    for r in rates)
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()  # no classifier: iBOT trains the backbone without labels
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)
        if masked_im_modeling:  # only the student has it: the teacher always sees whole crops
            self.masked_embed = nn.Parameter(torch.zeros(1, embed_dim))

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

    def prepare_tokens(self, x, mask=None):
        B, _, h, w = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        if mask is not None:  # (B, h, w) booleans, row-major like the patches
            x = torch.where(mask.flatten(1)[..., None], self.masked_embed.to(x.dtype), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1 + N, D)
        return x + self.interpolate_pos_encoding(x, h, w)

    def forward(self, x, return_all_tokens=None, mask=None):
        x = self.prepare_tokens(x, mask)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)  # (B, 1 + N, D)
        all_tokens = self.return_all_tokens if return_all_tokens is None else return_all_tokens
        return x if all_tokens else x[:, 0]  # (B, 1 + N, D) or the CLS token (B, D)


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
vit_tiny, vit_small = vit(192, 12, 3), vit(384, 12, 6)
vit_base, vit_large = vit(768, 12, 12), vit(1024, 24, 16)
ARCHS = dict(vit_nano=vit_nano, vit_tiny=vit_tiny, vit_small=vit_small, vit_base=vit_base,
             vit_large=vit_large)


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
        # torch._weight_norm(v, g, 0) is g * v / ||v|| per row, torch.nn.utils.weight_norm's fused
        # kernel: at K = 65536 ~10x faster on CPU than the formula, whose backward copies (K, D)
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x):
        return F.linear(x, self.weight)


class iBOTHead(nn.Module):
    """DINO's head (3-layer MLP -> L2-normalized bottleneck -> prototypes) on every token: its
    last_layer scores the [CLS] token (K prototypes), last_layer2 the patch tokens (patch_out_dim),
    the same module when shared_head (Zhou et al. 2022): state dicts list it twice, as official."""

    def __init__(self, in_dim, out_dim, patch_out_dim=8192, norm_last_layer=True, nlayers=3,
                 hidden_dim=2048, bottleneck_dim=256, shared_head=False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers = [m for a, b in zip(dims[:-1], dims[1:]) for m in (nn.Linear(a, b), nn.GELU())]
        layers = layers[:-1]  # no GELU after the bottleneck layer
        self.mlp = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
        self.apply(init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer2 = self.last_layer if shared_head else \
            WeightNormLinear(bottleneck_dim, patch_out_dim)
        # unit-norm prototypes make the logits cosine similarities; iBOT-vMF frees g, corrects them
        for layer in (self.last_layer, self.last_layer2):
            layer.weight_g.requires_grad = not norm_last_layer

    def project(self, x):
        return F.normalize(self.mlp(x), dim=-1)  # onto the unit sphere of the bottleneck

    def forward(self, x, patch_mask=None):
        """(B, D) [CLS] features -> (B, K) logits; (B, 1 + N, D) tokens -> ((B, K), (B, N, K2)).
        With patch_mask (B, N), only those patch tokens are scored, the other patch logits are 0:
        the patch loss reads masked tokens only, so the student skips most of the head's work for
        the exact loss and gradients. A CPU mask (as loaded) is read with no wait for the GPU."""
        if x.ndim == 2:
            return self.last_layer(self.project(x))
        if patch_mask is None:
            x = self.project(x)
            return self.last_layer(x[:, 0]), self.last_layer2(x[:, 1:])
        B = len(x)
        rows, cols = (i.to(x.device, non_blocking=True) for i in patch_mask.nonzero(as_tuple=True))
        y = self.project(torch.cat([x[:, 0], x[:, 1:][rows, cols]]))  # (B + masked, bottleneck)
        scored = self.last_layer2(y[B:])  # (masked tokens, K2)
        patch = scored.new_zeros(*patch_mask.shape, scored.shape[-1])
        return self.last_layer(y[:B]), patch.index_put((rows, cols), scored)

    def prototype_layers(self):
        """{name: layer} of the distinct last layers: one when shared, two otherwise."""
        layers = {"last_layer": self.last_layer, "last_layer2": self.last_layer2}
        return {"last_layer": self.last_layer} if self.last_layer2 is self.last_layer else layers


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per group of same-size crops (with their masks), the head once."""

    def __init__(self, backbone, head):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()  # drop any classifier
        self.backbone, self.head = backbone, head

    def forward(self, x, mask=None, return_all_tokens=None, patch_mask=None):
        """x: crops (B, 3, H, W); mask: their token masks (B, h, w) for the mask token; patch_mask:
        the same for the patch tokens the head must score (default all)."""
        crops = x if isinstance(x, (list, tuple)) else [x]
        masks = mask if isinstance(mask, (list, tuple)) or mask is None else [mask]
        feats = []
        for _, group in groupby(range(len(crops)), lambda i: crops[i].shape[-2:]):  # same size
            group = list(group)
            group_mask = None if masks is None else torch.cat([masks[i] for i in group])
            feats.append(self.backbone(torch.cat([crops[i] for i in group]), return_all_tokens,
                                       group_mask))
        if patch_mask is not None:
            patch_mask = torch.cat(list(patch_mask)).flatten(1)  # (n_crops * B, N)
        return self.head(torch.cat(feats), patch_mask)  # crop-major: crop 0's batch first


def build_models(args):
    """Student and teacher of one architecture; only the student has drop paths and a mask token."""
    backbone = partial(ARCHS[args.arch], patch_size=args.patch_size,
                       img_size=args.global_crops_size, return_all_tokens=True)
    student = backbone(drop_path_rate=args.drop_path,
                       masked_im_modeling=args.use_masked_im_modeling)
    teacher = backbone()
    head = partial(iBOTHead, student.embed_dim, args.out_dim, patch_out_dim=args.patch_out_dim,
                   norm_last_layer=args.norm_last_layer, hidden_dim=args.hidden_dim,
                   bottleneck_dim=args.bottleneck_dim)
    return (MultiCropWrapper(student, head(shared_head=args.shared_head)),
            MultiCropWrapper(teacher, head(shared_head=args.shared_head_teacher)))


# ==== 2. Crops (multi-crop) and block masks ===================================================
class GaussianBlur:
    """Blur with probability p and a random radius (PIL), as the official recipe."""

    def __init__(self, p, radius_min, radius_max):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if torch.rand(()) >= self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class DataAugmentationiBOT:
    """Multi-crop (Caron et al. 2021, Sec. 3.1): global views for teacher and student (the
    student's are masked), and local_crops_number small views for the student's [CLS] term only."""

    def __init__(self, global_crops_scale, local_crops_scale, global_crops_number,
                 local_crops_number, global_size, local_size, mean, std):
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2)])
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
        # The official blur radius (0.1 to 2 px) is meant for 224 px crops: scale it with the image.
        blur = partial(GaussianBlur, radius_min=0.1 * global_size / 224,
                       radius_max=2.0 * global_size / 224)
        crop = partial(transforms.RandomResizedCrop,
                       interpolation=transforms.InterpolationMode.BICUBIC)
        self.global_transfo1 = transforms.Compose([
            crop(global_size, global_crops_scale), flip_and_color_jitter, blur(1.0), normalize])
        self.global_transfo2 = transforms.Compose([
            crop(global_size, global_crops_scale), flip_and_color_jitter, blur(0.1),
            transforms.RandomSolarize(128, p=0.2), normalize])
        self.local_transfo = transforms.Compose([
            crop(local_size, local_crops_scale), flip_and_color_jitter, blur(0.5), normalize])
        self.global_crops_number, self.local_crops_number = global_crops_number, local_crops_number

    def __call__(self, image):
        crops = [self.global_transfo1(image)]
        crops += [self.global_transfo2(image) for _ in range(self.global_crops_number - 1)]
        return crops + [self.local_transfo(image) for _ in range(self.local_crops_number)]


def block_mask(H, W, num_masked, log_aspect_ratio, rng):
    """A (H, W) boolean mask of at most num_masked patches in rectangles (BEiT, Bao et al. 2022):
    whole blocks, not scattered patches, keep the task from being solved by copying a neighbour.
    Each block's area is drawn from [(min(H, W) // 3)^2, patches left] (16 on 14 x 14), its aspect
    ratio log-uniformly; it must add a new patch and not overshoot. After 10 failed draws in a row
    the mask is returned, usually a little short (about 57 of 59 patches at 0.3 on 14 x 14)."""
    mask = np.zeros((H, W), dtype=bool)
    count, min_area = 0, (min(H, W) // 3) ** 2
    while count < num_masked:
        left_to_mask, added = num_masked - count, 0
        for _ in range(10):
            area = rng.uniform(min_area, left_to_mask)
            aspect = math.exp(rng.uniform(*log_aspect_ratio))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < W and h < H:
                top, left = rng.randint(0, H - h), rng.randint(0, W - w)
                new = h * w - mask[top:top + h, left:left + w].sum()
                if 0 < new <= left_to_mask:
                    mask[top:top + h, left:left + w] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


class MaskedCrops(torch.utils.data.Dataset):
    """Wraps a dataset whose transform returns crops; adds one patch mask per global crop, made in
    the data-loader workers as the official ImageFolderMask does. Each global crop draws its masking
    ratio: one of pred_ratio at random, then uniform within +-pred_ratio_var (Zhou et al. 2022)."""

    def __init__(self, dataset, patch_size, global_crops_number, pred_ratio, pred_ratio_var,
                 pred_aspect_ratio, pred_shape="block", pred_start_epoch=0):
        self.dataset, self.patch_size, self.global_crops_number = dataset, patch_size, \
            global_crops_number
        self.pred_ratio, self.pred_ratio_var = list(pred_ratio), list(pred_ratio_var)
        self.log_aspect_ratio = tuple(math.log(a) for a in pred_aspect_ratio)
        self.pred_shape, self.pred_start_epoch, self.epoch = pred_shape, pred_start_epoch, 0

    def set_epoch(self, epoch):  # the main process sets it; workers are recreated every epoch
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def get_pred_ratio(self):  # Python's random: the DataLoader seeds it in each worker
        if self.epoch < self.pred_start_epoch:
            return 0.0
        # every candidate is drawn, then one chosen: the official order of draws, so the same seed
        # gives the official block masks (without local crops: the official loader masks those too)
        ratios = [random.uniform(r - var, r + var) if var > 0 else r
                  for r, var in zip(self.pred_ratio, self.pred_ratio_var)]
        return ratios[0] if len(ratios) == 1 else random.choice(ratios)

    def make_mask(self, H, W):
        num_masked = self.get_pred_ratio() * H * W
        if self.pred_shape == "block":
            return torch.from_numpy(block_mask(H, W, num_masked, self.log_aspect_ratio, random))
        mask = torch.zeros(H * W, dtype=torch.bool)
        mask[torch.randperm(H * W)[:int(num_masked)]] = True
        return mask.reshape(H, W)

    def __getitem__(self, i):
        crops, target = self.dataset[i]
        masks = [self.make_mask(c.shape[-2] // self.patch_size, c.shape[-1] // self.patch_size)
                 for c in crops[:self.global_crops_number]]
        return crops, target, masks


# ==== 3. The loss: iBOTLoss, with iBOT-vMF's normalizer and probability centring ==============
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


def temperature_schedule(warmup, final, warmup_epochs, nepochs, start_epoch=0):
    """One teacher temperature per epoch: held at warmup until start_epoch, then linear to final."""
    return np.concatenate((np.full(start_epoch, warmup), np.linspace(warmup, final, warmup_epochs),
                           np.full(nepochs - warmup_epochs - start_epoch, final)))


class iBOTLoss(nn.Module):
    """iBOT's two terms, L_[CLS] (lambda1) and L_MIM (lambda2), as in the module docstring: the
    patch cross-entropy is averaged over the masked tokens of each image, then over images (an
    image without masked tokens adds 0); the patch centre averages all tokens.
    With vmf_dim = p (iBOT-vMF), pass the prototype norms of both last layers: each logit gains
    log C_p(kappa_k), kappa_k = ||w_k|| / tau, and the teacher is centred in probability space:
    the centres are running means of teacher probabilities and the target is softmax(logits / tau -
    log c), i.e. q_k / c_k renormalized (our reading: the paper's exact centring is not public in a
    form we could check). The centres are floored at the smallest normal float: that of a prototype
    never picked shrinks by the momentum each step, into denormals, and to 0 where they are flushed
    (as on many accelerators): log c = -inf, NaN targets. Above the floor targets stay q_k / c_k."""

    def __init__(self, out_dim, patch_out_dim, ngcrops, nlcrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9, center_momentum2=0.9, lambda1=1.0,
                 lambda2=1.0, mim_start_epoch=0, vmf_dim=None):
        super().__init__()
        self.student_temp, self.ngcrops, self.ncrops = student_temp, ngcrops, ngcrops + nlcrops
        self.center_momentum, self.center_momentum2 = center_momentum, center_momentum2
        self.lambda1, self.lambda2, self.vmf_dim = lambda1, lambda2, vmf_dim
        start = (lambda k: 1.0 / k) if vmf_dim else (lambda k: 0.0)  # uniform probs, zero logits
        self.register_buffer("center", torch.full((1, out_dim), start(out_dim)))
        self.register_buffer("center2", torch.full((1, 1, patch_out_dim), start(patch_out_dim)))
        # A low teacher temperature from the start can make training unstable: warm it up linearly.
        # The patch temperature waits for masking to start (mim_start_epoch = --pred_start_epoch).
        self.teacher_temp_schedule = temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        self.teacher_temp2_schedule = temperature_schedule(
            warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs, nepochs,
            mim_start_epoch)

    def teacher_targets(self, logits, center, temp, norms):
        """Centred, sharpened teacher probabilities, and what the centre averages: logits (vMF:
        probabilities)."""
        logits = logits.float().detach()
        if self.vmf_dim:
            logits = logits / temp + vmf_log_normalizer(norms.detach() / temp, self.vmf_dim)
            return F.softmax(logits - torch.log(center), dim=-1), F.softmax(logits, dim=-1)
        return F.softmax((logits - center) / temp, dim=-1), logits

    def student_logp(self, logits, norms):
        s = logits.float() / self.student_temp
        if self.vmf_dim:
            s = s + vmf_log_normalizer(norms / self.student_temp, self.vmf_dim)
        return F.log_softmax(s, dim=-1)

    def forward(self, student_output, teacher_output, student_local_cls, student_mask, epoch,
                norms=None):
        """student_output: ((G * B, K) [CLS] logits, (G * B, N, K2) patch logits) of the masked
        global crops; teacher_output: the same for the whole global crops; student_local_cls:
        (L * B, K) or None; student_mask: G masks (B, h, w); norms (iBOT-vMF): prototype norms of
        the student's and teacher's last layers, keys s1, s2, t1, t2."""
        norms = norms or {}
        student_cls, student_patch = student_output
        teacher_cls, teacher_patch = teacher_output
        if student_local_cls is not None:
            student_cls = torch.cat([student_cls, student_local_cls])
        cls_logp = self.student_logp(student_cls, norms.get("s1")).chunk(self.ncrops)  # (B, K)
        patch_logp = self.student_logp(student_patch, norms.get("s2")).chunk(self.ngcrops)
        q_cls, cls_stat = self.teacher_targets(
            teacher_cls, self.center, self.teacher_temp_schedule[epoch], norms.get("t1"))
        q_patch, patch_stat = self.teacher_targets(
            teacher_patch, self.center2, self.teacher_temp2_schedule[epoch], norms.get("t2"))
        q_cls, q_patch = q_cls.chunk(self.ngcrops), q_patch.chunk(self.ngcrops)
        loss1 = loss2 = n1 = n2 = 0
        for q in range(self.ngcrops):
            for v in range(self.ncrops):
                if v == q:  # same view: masked patch prediction
                    per_token = torch.sum(-q_patch[q] * patch_logp[v], dim=-1)  # (B, N)
                    mask = student_mask[v].flatten(-2, -1).float()  # (B, N)
                    per_image = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
                    loss2, n2 = loss2 + per_image.mean(), n2 + 1
                else:  # other views: DINO's [CLS] term
                    loss1, n1 = loss1 + torch.sum(-q_cls[q] * cls_logp[v], dim=-1).mean(), n1 + 1
        loss1 = loss1 / max(n1, 1) * self.lambda1
        loss2 = loss2 / n2 * self.lambda2
        self.update_center(cls_stat, patch_stat)
        self.teacher_probs = torch.cat(q_cls).detach()  # kept for monitoring (entropy, usage)
        return dict(cls=loss1, patch=loss2, loss=loss1 + loss2)

    @torch.no_grad()
    def update_center(self, teacher_cls, teacher_patch):
        """EMA of the batch means over all processes: logits (iBOT), probabilities (iBOT-vMF)."""
        batch = torch.cat([teacher_cls.sum(dim=0), teacher_patch.mean(dim=1).sum(dim=0)])
        world = 1
        if dist.is_available() and dist.is_initialized():  # one all-reduce for both centres
            dist.all_reduce(batch)
            world = dist.get_world_size()
        batch = batch / (len(teacher_cls) * world)
        K, m, m2 = self.center.shape[-1], self.center_momentum, self.center_momentum2
        self.center = self.center * m + batch[:K].view_as(self.center) * (1 - m)
        self.center2 = self.center2 * m2 + batch[K:].view_as(self.center2) * (1 - m2)
        if self.vmf_dim:  # the floor of the class docstring
            tiny = torch.finfo(torch.float32).tiny
            self.center, self.center2 = self.center.clamp_min(tiny), self.center2.clamp_min(tiny)


# ==== 4. The training step: schedules, optimizer groups, clipping, the EMA teacher ============
def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     start_warmup_value=0):
    """One value per iteration: linear warm-up, then half a cosine from base_value to final_value"""
    warmup = np.linspace(start_warmup_value, base_value, warmup_epochs * niter_per_ep)
    iters = np.arange(epochs * niter_per_ep - len(warmup))
    cosine = 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, final_value + cosine))


def get_params_groups(model, weight_decay_last_layer=None):
    """No weight decay on biases and norm parameters (1-D), as official; weight_decay_last_layer
    puts the prototypes (last_layer, last_layer2) in a third group with their own decay schedule."""
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
    """Official DINO / iBOT clipping: each parameter's gradient on its own to norm <= clip."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_((clip / (p.grad.norm() + 1e-6)).clamp(max=1.0))  # a tensor op: no host sync


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """Prototypes fixed during the first epochs: DINO (Sec. 3.1) finds it stabilizes training."""
    if epoch < freeze_last_layer:
        for name, p in model.named_parameters():
            if "last_layer" in name:
                p.grad = None


def ema_pairs(student, teacher):
    """Each teacher parameter and the student parameter of the same name (state dicts list a shared
    layer under both names; the student's mask token has no twin). A shared teacher layer follows
    the student's last_layer, as in main_ibot.py. A separate teacher last_layer2 follows a shared
    student layer: main_ibot.py pairs by named_parameters(), which lists a shared layer once, so
    it never updates it and the teacher's patch prototypes stay at their start (our departure)."""
    student_params = student.state_dict(keep_vars=True)
    names = [n for n, _ in teacher.named_parameters()]
    # detached views of the student's parameters: they see the optimizer's updates
    return [student_params[n].detach() for n in names], [p for _, p in teacher.named_parameters()]


@torch.no_grad()
def init_teacher(student, teacher):
    """The teacher starts as the student, as main_ibot.py's load_state_dict(strict=False): a shared
    teacher layer is loaded under both its names and ends as the student's last_layer2 (registered
    last); the student's mask token, which the teacher never uses, stays out."""
    teacher.load_state_dict(student.state_dict(), strict=False)


def vmf_norms(student, teacher):
    """Prototype norms ||w_k|| (= |weight_g|) of both last layers, for the vMF normalizer."""
    norm = lambda layer: layer.weight_g.squeeze(1).abs()
    return dict(s1=norm(student.head.last_layer), s2=norm(student.head.last_layer2),
                t1=norm(teacher.head.last_layer), t2=norm(teacher.head.last_layer2))


def train_one_epoch(student, teacher, student_without_ddp, ibot_loss, loader, optimizer, schedules,
                    epoch, scaler, amp_dtype, args, device, rank):
    lr_schedule, wd_schedule, momentum_schedule, wd_last_schedule = schedules
    student_params, teacher_params = ema_pairs(student_without_ddp, teacher)
    prototype_layers = list(student_without_ddp.head.prototype_layers().values())
    G = args.global_crops_number
    # running sums of loss, cls term, patch term, KoLeo term, teacher entropy: no host sync per step
    sums = torch.zeros(5, device=device)
    usage = torch.zeros(args.out_dim, dtype=torch.long, device=device)
    # A non-finite loss changes nothing: a fused optimizer skips the step on the device (found_inf,
    # as GradScaler; read every 20 steps: no host sync); others (CPU: no wait) stop the run first.
    on_device = bool(optimizer.defaults.get("fused"))
    first_bad = torch.zeros(2, device=device)  # step and value of the first bad loss
    autocast = partial(torch.autocast, device.type, dtype=amp_dtype or torch.float32,
                       enabled=amp_dtype is not None)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0, leave=False)
    for i, (crops, _, masks) in enumerate(bar):
        it = len(loader) * epoch + i  # global step: the schedules are per iteration
        for j, group in enumerate(optimizer.param_groups):
            group["lr"] = float(lr_schedule[it])  # Python floats: numpy scalars cannot load safely
            if j == 0:  # the regularized group follows the schedule, the prototypes' their own
                group["weight_decay"] = float(wd_schedule[it])
            elif j == 2:
                group["weight_decay"] = float(wd_last_schedule[it])
        crops = [c.to(device, non_blocking=True) for c in crops]
        masks_cpu, masks = masks, [m.to(device, non_blocking=True) for m in masks]  # G x (B, h, w)
        with autocast():
            teacher_output = teacher(crops[:G])  # whole global crops: ((G*B, K), (G*B, N, K2))
            student_output = student(crops[:G], mask=masks if args.use_masked_im_modeling else None,
                                     patch_mask=masks_cpu)
            # local crops only feed the [CLS] term: no patch tokens through the head
            student_local_cls = None if len(crops) == G else \
                student(crops[G:], return_all_tokens=False)
            norms = vmf_norms(student_without_ddp, teacher) if args.vmf else None
            centers = ibot_loss.center, ibot_loss.center2
            losses = ibot_loss(student_output, teacher_output, student_local_cls, masks, epoch,
                               norms)
            koleo = sum(koleo_proto.koleo_proto_loss(p.weight) for p in prototype_layers) \
                if args.koleo > 0 else torch.zeros((), device=device)  # each last layer on its own
            total = losses["loss"] + args.koleo * koleo
        finite = koleo_proto.all_finite(total)  # a bad step changes neither centre
        ibot_loss.center = torch.where(finite, ibot_loss.center, centers[0])
        ibot_loss.center2 = torch.where(finite, ibot_loss.center2, centers[1])
        if not on_device and not finite:
            raise koleo_proto.diverged(total.item(), epoch, i + 1)
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

        with torch.no_grad():  # teacher = exponential moving average of the student
            # torch._foreach_mul_/_add_ do `for t, s in zip(teacher, student): t.mul_(m).add_(s,
            # alpha=1 - m)` in one fused kernel per step, as torch.optim's foreach mode does
            m = momentum_schedule[it]
            if on_device:  # a skipped step leaves the teacher as it is
                m = torch.where(finite, m, 1.0)
                torch._foreach_mul_(teacher_params, m)
                torch._foreach_add_(teacher_params, torch._foreach_mul(student_params, 1 - m))
            else:
                torch._foreach_mul_(teacher_params, m)
                torch._foreach_add_(teacher_params, student_params, alpha=1 - m)
            q = ibot_loss.teacher_probs
            entropy = -(q * torch.log(q + 1e-12)).sum(dim=-1).mean()
            sums += torch.stack([losses["loss"].detach(), losses["cls"].detach(),
                                 losses["patch"].detach(), koleo.detach(), entropy])
            usage += koleo_proto.assignment_histogram(q)

        if (i + 1) % 20 == 0 or i + 1 == len(loader):  # the only host sync: NaN check, the loss
            loss_sum, bad, value = torch.cat([sums[:1], first_bad]).tolist()
            if bad:
                raise koleo_proto.diverged(value, epoch, int(bad))
            bar.set_postfix(loss=f"{loss_sum / (i + 1):.4f}")
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(usage)
        sums /= dist.get_world_size()
    loss_mean, cls_mean, patch_mean, koleo_mean, entropy_mean = (sums / len(loader)).tolist()
    stats = dict(loss=loss_mean, loss_cls=cls_mean, loss_patch=patch_mean,
                 lr=float(lr_schedule[it]), wd=float(wd_schedule[it]), teacher_entropy=entropy_mean)
    if args.koleo > 0:
        stats["koleo_train"] = koleo_mean
    return stats, usage


# ==== 5. The training loop ====================================================================
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = koleo_proto.init_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    amp_dtype = koleo_proto.amp_dtype(args.precision, device)  # None: fp32
    koleo_proto.seed_everything(args.seed)
    # data: the crops of each image, and a block mask per global crop (made in the workers)
    augment = DataAugmentationiBOT(args.global_crops_scale, args.local_crops_scale,
                                   args.global_crops_number, args.local_crops_number,
                                   args.global_crops_size, args.local_crops_size,
                                   *koleo_proto.DATASETS[args.data])
    train_set = koleo_proto.build_dataset(args, True, augment)
    indices = koleo_proto.training_indices(args, train_set.targets)  # --long_tail, --subset
    masked_crops = MaskedCrops(torch.utils.data.Subset(train_set, indices), args.patch_size,
                               args.global_crops_number, args.pred_ratio, args.pred_ratio_var,
                               args.pred_aspect_ratio, args.pred_shape, args.pred_start_epoch)
    loader = koleo_proto.train_loader(args, masked_crops, train_set.targets, indices, world,
                                      device, say)
    n_batches, total_batch = len(loader), args.batch_size_per_gpu * world

    # models, loss, optimizer
    student, teacher = (m.to(device) for m in build_models(args))
    koleo_proto.compile_models(args, student, teacher, say)
    student_without_ddp, student = student, koleo_proto.ddp(student, device)
    init_teacher(student_without_ddp, teacher)
    teacher.requires_grad_(False)  # no backpropagation through the teacher
    say(describe_model(args, student_without_ddp))
    ibot_loss = iBOTLoss(args.out_dim, args.patch_out_dim, args.global_crops_number,
                         args.local_crops_number, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_patch_temp, args.teacher_patch_temp,
                         args.warmup_teacher_temp_epochs, args.epochs, lambda1=args.lambda1,
                         lambda2=args.lambda2, mim_start_epoch=args.pred_start_epoch,
                         vmf_dim=args.bottleneck_dim if args.vmf else None).to(device)
    params = get_params_groups(student_without_ddp, args.weight_decay_last_layer)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, fused=fused) if args.optimizer == "adamw" else \
        torch.optim.SGD(params, lr=0, momentum=0.9, fused=fused)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    # per iteration; the lr scaled linearly with the total batch (Goyal et al., 2017)
    schedules = (
        cosine_scheduler(args.lr * total_batch / 256, args.min_lr, args.epochs, n_batches,
                         args.warmup_epochs),
        cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, n_batches),
        cosine_scheduler(args.momentum_teacher, 1, args.epochs, n_batches),
        None if args.weight_decay_last_layer is None else  # the prototypes' own decay, if asked
        cosine_scheduler(args.weight_decay, args.weight_decay_last_layer, args.epochs, n_batches))

    run_state = koleo_proto.resume_run(args, rank, load_checkpoint, SHAPE_FLAGS,
                                       student_without_ddp, teacher, optimizer,
                                       {"ibot_loss": ibot_loss, "fp16_scaler": scaler}, say)
    eval_sets = koleo_proto.eval_datasets(args)
    knn = partial(koleo_proto.knn_eval, args, teacher, eval_sets, indices, device, amp_dtype,
                  return_all_tokens=False)  # on the teacher's [CLS] token
    if not run_state["resumed"]:  # the baseline the training must beat: the untrained teacher
        run_state["knn_top1_init"] = knn(pixels=False)["knn_top1"]
        if run_state["knn_top1_init"] is not None:
            say(f"kNN top-1 of the untrained teacher: {run_state['knn_top1_init']:.2f}%")

    for epoch in range(run_state["epoch"], args.epochs):
        koleo_proto.reseed(args, loader, epoch, rank)
        masked_crops.set_epoch(epoch)  # the masks too
        t0 = time.time()
        stats, usage = train_one_epoch(student, teacher, student_without_ddp, ibot_loss, loader,
                                       optimizer, schedules, epoch, scaler, amp_dtype, args, device,
                                       rank)
        elapsed = time.time() - t0
        run_state.update(epoch=epoch + 1, seconds=run_state["seconds"] + elapsed)
        if rank == 0:
            stats = dict(epoch=epoch + 1, **stats, images_per_s=n_batches * total_batch / elapsed,
                         **prototype_stats(teacher, student_without_ddp, usage),
                         seconds=run_state["seconds"])
            end_of_epoch(args, run_state, stats, student_without_ddp, teacher, optimizer,
                         ibot_loss, scaler, say)

    # evaluation: kNN on teacher CLS features, raw-pixel kNN on the same split, collapse
    summary = knn()
    if rank == 0:
        koleo_proto.write_summary(args, summary, run_state, len(indices),
                                  prototype_stats(teacher, student_without_ddp), say)
    if dist.is_initialized():
        dist.destroy_process_group()


# ##############################################################################################
#                          A FIRST READING CAN STOP HERE: THE METHOD ENDS.
#   Below: flags, presets and their checks, checkpoints and logs; the rest is koleo_proto.py's.
# ##############################################################################################
# Every flag a preset may set: name -> (official default of main_ibot.py, meaning). The type on
# the command line follows the default's (a 2-tuple: two floats; a list: one or more).
FLAGS = dict(
    arch=("vit_small", "backbone (names at the end)"),
    patch_size=(16, "ViT patch side in pixels"),
    out_dim=(8192, "[CLS] prototypes K: rows of the last layer"),
    patch_out_dim=(8192, "patch prototypes (= out_dim if shared)"),
    shared_head=(False, "one last layer for [CLS] and patch tokens"),
    shared_head_teacher=(True, "the same for the teacher"),
    norm_last_layer=(True, "unit-norm prototypes (--vmf: false)"),
    hidden_dim=(2048, "width of the head's hidden layers"),
    bottleneck_dim=(256, "L2-normalized bottleneck the prototypes live in"),
    momentum_teacher=(0.996, "teacher EMA momentum, cosine to 1"),
    warmup_teacher_temp=(0.04, "[CLS] teacher temperature, start of warm-up"),
    teacher_temp=(0.04, "[CLS] teacher temperature after warm-up"),
    warmup_teacher_patch_temp=(0.04, "patch teacher temperature, start of warm-up"),
    teacher_patch_temp=(0.07, "patch teacher temperature after warm-up"),
    warmup_teacher_temp_epochs=(30, "epochs of teacher temperature warm-up (both)"),
    lambda1=(1.0, "weight of the [CLS] (DINO) term"),
    lambda2=(1.0, "weight of the masked-patch (MIM) term"),
    pred_ratio=([0.3], "fractions masked (each image picks one)"),
    pred_ratio_var=([0.0], "U(r - var, r + var), one var per ratio"),
    pred_aspect_ratio=((0.3, 1 / 0.3), "mask-block aspect ratios, log-uniform"),
    pred_shape=("block", "mask shape: BEiT-style blocks or random patches"),
    pred_start_epoch=(0, "epoch from which patches are masked"),
    weight_decay=(0.04, "initial weight decay, cosine to --weight_decay_end"),
    weight_decay_end=(0.4, "final weight decay"),
    weight_decay_last_layer=(None, "prototypes' own final weight decay (None: as the rest)"),
    clip_grad=(3.0, "max gradient norm per parameter tensor (0 = off)"),
    batch_size_per_gpu=(128, "images per process and step"),
    epochs=(100, "training epochs"),
    freeze_last_layer=(1, "epochs during which the prototypes get no update"),
    lr=(0.0005, "peak lr per 256 images of the total batch"),
    warmup_epochs=(10, "epochs of linear lr warm-up"),
    min_lr=(1e-6, "lr at the end of the cosine schedule"),
    optimizer=("adamw", "adamw or sgd"),
    drop_path=(0.1, "student's drop-path rate (= --drop_path_rate)"),
    global_crops_number=(2, "global crops (teacher's, masked for the student)"),
    global_crops_scale=((0.14, 1.0), "area range of the global crops"),
    local_crops_number=(0, "local crops per image (0 = no multi-crop)"),
    local_crops_scale=((0.05, 0.4), "area range of the local crops"),
    global_crops_size=(224, "side of the global crops in pixels"),
    local_crops_size=(96, "side of the local crops in pixels"),
    saveckp_freq=(40, "also keep checkpointNNNN.pth every N epochs"),
    num_workers=(10, "data-loading processes per training process"))
OFFICIAL = {name: default for name, (default, _) in FLAGS.items()}
CHOICES = dict(arch=ARCHS, pred_shape=["block", "rand"], optimizer=["adamw", "sgd"])

# What `python ibot.py` runs (--data fashion-mnist, the bundled sample) where it departs from the
# official values, in minutes on 2 CPU cores. Small images need small crops: a 28 px image upsampled
# to 224 px costs 64x the compute for no information, so the global crops keep the native size,
# the local ones half of it, and the patches shrink with the image (4 x 4 patches of 7 px). So that
# 4 epochs visibly learn (kNN 6.5 points over the untrained teacher, 5.7 with --seed 1;
# docs/benchmarks.md): a head 4x narrower than official (a quarter of the step saved), batch 32
# with 2 local crops, a sharper (0.02) and faster (momentum 0.98) teacher, prototypes free from
# the first step; the ViT-S/16 recipe's head and masks (below).
BUNDLED = dict(
    arch="vit_nano", patch_size=7, out_dim=1024, patch_out_dim=1024, hidden_dim=512,
    shared_head=True, norm_last_layer=False, momentum_teacher=0.98, warmup_teacher_temp=0.02,
    teacher_temp=0.02, warmup_teacher_temp_epochs=0, freeze_last_layer=0, pred_ratio=[0.0, 0.3],
    pred_ratio_var=[0.0, 0.2], batch_size_per_gpu=32, epochs=4, lr=0.004, warmup_epochs=1,
    min_lr=1e-4, drop_path=0.0, global_crops_size=28, local_crops_size=14, local_crops_number=2,
    global_crops_scale=(0.5, 1.0), local_crops_scale=(0.15, 0.5), saveckp_freq=1, num_workers=2)
# The README's ViT-S/16 recipe (800 epochs at batch 1024 in the paper; 100 here, as DINO's).
VIT_S16 = dict(teacher_temp=0.07, norm_last_layer=False, shared_head=True, local_crops_number=10,
               global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25),
               pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2], batch_size_per_gpu=64)
SMALL_IMAGES = dict(VIT_S16, patch_size=4, drop_path=0.0, warmup_epochs=2, min_lr=1e-5,
                    saveckp_freq=5, warmup_teacher_temp_epochs=0)  # CIFAR, all of Fashion-MNIST
PRESETS = {"imagenet": VIT_S16, "folder": VIT_S16, "fashion-mnist": BUNDLED,
           "fashion-mnist-full": dict(SMALL_IMAGES, arch="vit_tiny", out_dim=4096, epochs=100,
                                      patch_out_dim=4096, lr=0.001, global_crops_size=28,
                                      local_crops_size=12, global_crops_scale=(0.5, 1.0),
                                      local_crops_scale=(0.15, 0.5), num_workers=4),
           "cifar10": dict(SMALL_IMAGES, out_dim=8192, epochs=200, lr=0.001, global_crops_size=32,
                           local_crops_size=16, global_crops_scale=(0.3, 1.0),
                           local_crops_scale=(0.1, 0.4), num_workers=8)}
PRESETS["cifar100"] = PRESETS["cifar10"]


def get_args_parser():
    p = koleo_proto.method_parser("ibot.py", "iBOT / iBOT-vMF with KoLeo-Proto", "main_ibot.py",
                                  ARCHS, PRESETS)
    metavars = {bool: "BOOL", int: "N", float: "X", str: "NAME", type(None): "X"}
    for name, (official, meaning) in FLAGS.items():  # default None: the preset's, else official
        kind = type(official[0] if isinstance(official, (list, tuple)) else official)
        ours, theirs = (koleo_proto.show(v) for v in (BUNDLED.get(name, official), official))
        default = ours if ours == theirs else f"{ours}; official {theirs}"
        p.add_argument(f"--{name}", help=f"{meaning} [{default}]", metavar=metavars[kind],
                       type={bool: koleo_proto.bool_flag, type(None): float}.get(kind, kind),
                       nargs={list: "+", tuple: 2}.get(type(official)), choices=CHOICES.get(name))
    p.add_argument("--drop_path_rate", dest="drop_path", type=float, help=argparse.SUPPRESS)
    p.add_argument("--use_masked_im_modeling", type=koleo_proto.bool_flag, default=True,
                   metavar="BOOL", help="mask token on the student's masked patches")
    p.add_argument("--vmf", action="store_true",
                   help="iBOT-vMF: vMF normalizer, probability centring")
    koleo_proto.add_run_flags(p, PRESETS)  # --data, --koleo, --output_dir, --resume, --seed, ...
    return p


def parse_args(argv=None):
    args = get_args_parser().parse_args(argv)
    koleo_proto.fill_defaults(args, OFFICIAL, PRESETS, "ibot", lambda a: dict(
        warmup_epochs=a.epochs, warmup_teacher_temp_epochs=a.epochs - a.pred_start_epoch))
    if args.shared_head or args.shared_head_teacher:
        args.patch_out_dim = args.out_dim  # one set of prototypes serves both tokens on one side
    if len(args.pred_ratio_var) == 1:
        args.pred_ratio_var = args.pred_ratio_var * len(args.pred_ratio)
    check_args(args)
    return args


def check_args(a):
    pairs = list(zip(a.pred_ratio, a.pred_ratio_var))
    temps = a.teacher_temp, a.warmup_teacher_temp, a.teacher_patch_temp, a.warmup_teacher_patch_temp
    koleo_proto.check_run_args(a, [  # iBOT's own checks, then those shared with dino.py
        (min(a.out_dim, a.patch_out_dim) < 2, "--out_dim and --patch_out_dim need 2 prototypes"),
        (a.global_crops_number < 1, "--global_crops_number must be at least 1"),
        (a.global_crops_number + a.local_crops_number < 2,
         "iBOT needs at least 2 crops: raise --local_crops_number"),
        (not 0 <= a.warmup_teacher_temp_epochs + a.pred_start_epoch <= a.epochs,
         f"--warmup_teacher_temp_epochs {a.warmup_teacher_temp_epochs} (+ --pred_start_epoch "
         f"{a.pred_start_epoch}) must lie in [0, --epochs {a.epochs}]"),
        (min(temps) <= 0, "teacher temperatures must be positive"),
        (len(a.pred_ratio_var) != len(a.pred_ratio),
         f"--pred_ratio_var takes one value or one per --pred_ratio ({len(a.pred_ratio)})"),
        (any(not 0 <= r - v <= r + v <= 1 for r, v in pairs),
         "each --pred_ratio r with its --pred_ratio_var v needs 0 <= r - v and r + v <= 1"),
        (not 0 < a.pred_aspect_ratio[0] <= a.pred_aspect_ratio[1],
         "--pred_aspect_ratio needs 0 < low <= high"),
        (not 0 <= a.drop_path < 1, "--drop_path must lie in [0, 1)"),
    ])


# ---------------- checkpoints (refused by name if trained with other weight-shaping flags), logs
SHAPE_FLAGS = ("arch", "patch_size", "global_crops_size", "out_dim", "patch_out_dim", "shared_head",
               "shared_head_teacher", "hidden_dim", "bottleneck_dim", "vmf", "norm_last_layer",
               "use_masked_im_modeling")


def load_checkpoint(path):  # ours or official: a dict with at least 'teacher'
    return koleo_proto.load_checkpoint(path, "iBOT", OFFICIAL["hidden_dim"])


def describe_model(args, student):
    heads = [f"{side}: {'shared' if shared else 'separate'} patch head" for side, shared in
             (("student", args.shared_head), ("teacher", args.shared_head_teacher))]
    return (f"model: {args.arch}, {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M "
            f"parameters, {args.out_dim} prototypes ({args.patch_out_dim} patch), "
            + ", ".join(heads) + (", iBOT-vMF" if args.vmf else "")
            + (f", KoLeo-Proto lambda={args.koleo} on each last layer" if args.koleo else ""))


def prototype_stats(teacher, student, usage=None):
    """Collapse figures (the paper's Sec. 4) of the teacher's prototypes, per distinct last layer
    (keys of last_layer2 end in _patch), and their use on the data; those of the student's [CLS]
    prototypes too (keys ending in _student): an EMA of the student, the teacher collapses later."""
    stats = koleo_proto.collapse_stats(student.head.last_layer.weight.detach(), "_student")
    for name, layer in teacher.head.prototype_layers().items():
        stats.update(koleo_proto.collapse_stats(layer.weight.detach(),
                                                "_patch" if name == "last_layer2" else ""))
    if usage is not None:
        stats.update({f"usage_{k}": v for k, v in koleo_proto.usage_stats(usage).items()})
    return stats


def end_of_epoch(args, run_state, stats, student, teacher, optimizer, ibot_loss, scaler, say):
    """Rank 0: the checkpoint (official layout, + seconds, knn_top1_init), log.txt, plot, line."""
    state = koleo_proto.training_state(args, run_state, student, teacher, optimizer, scaler,
                                       ibot_loss=ibot_loss)
    koleo_proto.save_epoch(args, state, stats, f"ibot.py --data {args.data}")
    patch = f" (patch {stats['unique_prototypes_patch']}/{args.patch_out_dim})" \
        if "unique_prototypes_patch" in stats else ""
    say(f"epoch {stats['epoch']}/{args.epochs}  loss {stats['loss']:.4f} (cls "
        f"{stats['loss_cls']:.4f}, patch {stats['loss_patch']:.4f})  unique prototypes "
        f"{stats['unique_prototypes']}/{args.out_dim}{patch} (student "
        f"{stats['unique_prototypes_student']})  used {stats['usage_used']}  teacher entropy "
        f"{stats['teacher_entropy']:.2f}  {stats['images_per_s']:.0f} img/s")


if __name__ == "__main__":
    koleo_proto.run(main, "ibot.py")
