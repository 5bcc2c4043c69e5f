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
EMA teacher). A divider then marks the plumbing a first reading can skip: flags and presets, and
main (the epoch loop); the rest of it (datasets, checkpoints, DDP, kNN, errors) is koleo_proto.py's.
Runs:
  python dino.py                                    # bundled Fashion-MNIST sample, CPU, minutes
  python dino.py --koleo 0.1                        # the same with KoLeo-Proto
  torchrun --nproc_per_node 8 dino.py --data imagenet --data_path /imagenet   # official recipe
Names (VisionTransformer, DINOHead, MultiCropWrapper, DINOLoss), flags, defaults and checkpoint
keys are those of facebookresearch/dino, so official checkpoints load here and ours load there.
"""
import math
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import ImageFilter
from torchvision import models, transforms
from torchvision.ops import StochasticDepth
from tqdm import tqdm

import koleo_proto

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
    student distribution of every other view (Caron et al. 2021, Eq. 1, 3 and 4; centring and
    sharpening: the module's docstring).

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
        finite = koleo_proto.all_finite(total)
        dino_loss.center = torch.where(finite, dino_loss.center, center)  # nor the centre
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
                raise koleo_proto.diverged(value, epoch, int(bad))
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


def prototype_stats(teacher, student, usage=None):
    """Collapse figures of the teacher's prototypes (the paper's Sec. 4) and their use on the data,
    and those of the student's (keys ending in _student): the teacher is an EMA of the student,
    so the student's prototypes show a collapse first."""
    stats = koleo_proto.collapse_stats(teacher.head.last_layer.weight.detach())
    stats.update(koleo_proto.collapse_stats(student.head.last_layer.weight.detach(), "_student"))
    if usage is not None:
        stats.update({f"usage_{k}": v for k, v in koleo_proto.usage_stats(usage).items()})
    return stats


# ==============================================================================================
# PLUMBING. A first reading can stop here: the method is all above. What follows makes it a
# program: flags and presets, their checks, and main (data, models, resume, the epoch loop, the
# summary). The datasets, checkpoints, DDP set-up, kNN evaluation and one-line errors it calls are
# part 5 of koleo_proto.py, shared with ibot.py.
# ==============================================================================================
BadInput = koleo_proto.BadInput  # a bad flag or file: one line, no traceback (run)


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

# Small images need small crops: a 28 px image upsampled to 224 px costs 64x the compute and adds
# no information, so global crops keep the native size, local crops are about half of it (96/224
# officially) and the patches shrink with the image. The default run fits in minutes on 2 CPU
# cores: a 6-block ViT on a 4 x 4 grid of 7 px patches, 1024 prototypes, a head 4x narrower than
# the official one (a quarter of the step saved), small batches, 2 local crops, a sharper and
# faster teacher, prototypes free from the start: 5 epochs in 9 to 11 minutes that lift the
# teacher's kNN by 6 points (docs/benchmarks.md has the trials behind each value).
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


def get_args_parser():
    p = koleo_proto.method_parser("dino.py", "DINO / DINO-vMF with KoLeo-Proto", "main_dino.py",
                                  ARCHS, PRESETS)

    def preset(name, metavar, help, **kw):  # a flag whose default comes from the preset
        ours, official = (koleo_proto.show(d[name]) for d in (DEFAULT_RUN, OFFICIAL))
        default = ours if ours == official else f"{ours}; official {official}"
        p.add_argument(f"--{name}", metavar=metavar, help=f"{help} [{default}]", **kw)

    preset("arch", "NAME", "backbone (names at the end)", choices=list(ARCHS))
    preset("patch_size", "PX", "ViT patch side", type=int)
    preset("out_dim", "K", "prototypes: rows of the head's last layer", type=int)
    preset("hidden_dim", "D", "width of the head's hidden layers", type=int)
    preset("bottleneck_dim", "D", "L2-normalized bottleneck the prototypes live in", type=int)
    preset("norm_last_layer", "BOOL", "unit-norm prototypes, weight_g frozen (--vmf: false)",
           type=koleo_proto.bool_flag)
    preset("use_bn_in_head", "BOOL", "BatchNorm in the head's MLP", type=koleo_proto.bool_flag)
    preset("momentum_teacher", "M", "teacher EMA momentum, cosine to 1", type=float)
    preset("warmup_teacher_temp", "T", "teacher temperature at the start of warm-up", type=float)
    preset("teacher_temp", "T", "teacher temperature after warm-up (sharpens)", type=float)
    preset("warmup_teacher_temp_epochs", "N", "epochs of teacher temperature warm-up", type=int)
    preset("weight_decay", "WD", "initial weight decay, cosine to --weight_decay_end", type=float)
    preset("weight_decay_end", "WD", "final weight decay", type=float)
    preset("weight_decay_last_layer", "WD", "prototypes' own final decay (None: as the rest)",
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
    p.add_argument("--vmf", action="store_true",
                   help="DINO-vMF: vMF normalizer, probability centring")
    p.add_argument("--init", metavar="PATH",
                   help="new run from a checkpoint's teacher (fresh optimizer)")
    koleo_proto.add_run_flags(p, PRESETS)
    return p


def parse_args(argv=None):
    args = get_args_parser().parse_args(argv)
    koleo_proto.fill_defaults(args, OFFICIAL, PRESETS, "dino", lambda a: dict(
        warmup_epochs=a.epochs, warmup_teacher_temp_epochs=a.epochs))
    a = args
    koleo_proto.check_run_args(a, [
        (a.out_dim < 2, f"--out_dim {a.out_dim}: DINO needs at least 2 prototypes"),
        (a.use_bn_in_head and a.batch_size_per_gpu < 2,
         "--use_bn_in_head needs --batch_size_per_gpu >= 2"),
        (not 0 <= a.warmup_teacher_temp_epochs <= a.epochs,
         f"--warmup_teacher_temp_epochs {a.warmup_teacher_temp_epochs} must lie in [0, --epochs "
         f"{a.epochs}]"),
        (min(a.teacher_temp, a.warmup_teacher_temp) <= 0, "teacher temperatures must be positive"),
    ])
    return args


# ---- main: data, models, resume, the epoch loop, the summary
SHAPE_FLAGS = ("arch", "patch_size", "global_crops_size", "out_dim", "hidden_dim", "bottleneck_dim",
               "use_bn_in_head", "vmf", "norm_last_layer")  # the flags that shape the weights


def prepare_models(args, device, world, say):
    """Student and teacher on the device: synced BatchNorm, torch.compile, DDP, as asked."""
    student, teacher = (m.to(device) for m in build_models(args))
    if world > 1 and device.type == "cuda":  # BatchNorm (ResNet, --use_bn_in_head): global batch
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    koleo_proto.compile_models(args, student, teacher, say)
    student_without_ddp, student = student, koleo_proto.ddp(student, device)
    teacher.load_state_dict(student_without_ddp.state_dict())  # the teacher starts as the student
    teacher.requires_grad_(False)  # no backpropagation through the teacher
    say(f"model: {args.arch}, {sum(p.numel() for p in student_without_ddp.parameters()) / 1e6:.1f}M"
        f" parameters, {args.out_dim} prototypes" + (", DINO-vMF" if args.vmf else "")
        + (f", KoLeo-Proto lambda={args.koleo}" if args.koleo else ""))
    return student, teacher, student_without_ddp


load_checkpoint = partial(koleo_proto.load_checkpoint, method="DINO",
                          hidden_dim=OFFICIAL["hidden_dim"])  # an old checkpoint: official width


def init_from(args, student, teacher, optimizer, dino_loss, say):
    """--init: a new run from another run's teacher, its weights in both networks and its centre;
    the optimizer and the schedules start afresh."""
    init = load_checkpoint(args.init)
    if not any(k.startswith(("head.mlp", "module.head.mlp")) for k in init["teacher"]):
        raise BadInput(f"{args.init} does not fit this model: it holds no head MLP (a copy for "
                       "audits); --init needs the whole teacher (slim_checkpoint.py "
                       "--whole_teacher)")
    koleo_proto.restore({**{k: init[k] for k in ("args", "dino_loss") if k in init},
                         "student": init["teacher"], "teacher": init["teacher"]}, args.init, args,
                        SHAPE_FLAGS, student, teacher, optimizer, {"dino_loss": dino_loss})
    say(f"student and teacher start from the teacher of {args.init}")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = koleo_proto.init_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    amp_dtype = koleo_proto.amp_dtype(args.precision, device)
    koleo_proto.seed_everything(args.seed)

    augment = DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale,
                                   args.local_crops_number, args.global_crops_size,
                                   args.local_crops_size, *koleo_proto.DATASETS[args.data])
    train_set = koleo_proto.build_dataset(args, True, augment)
    indices = koleo_proto.training_indices(args, train_set.targets)
    loader = koleo_proto.train_loader(args, torch.utils.data.Subset(train_set, indices),
                                      train_set.targets, indices, world, device, say)
    student, teacher, student_without_ddp = prepare_models(args, device, world, say)
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp,
                         args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs,
                         vmf_dim=args.bottleneck_dim if args.vmf else None).to(device)
    params = get_params_groups(student_without_ddp, args.weight_decay_last_layer)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, fused=fused) if args.optimizer == "adamw" else \
        torch.optim.SGD(params, lr=0, momentum=0.9, fused=fused)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    # schedules per iteration, the lr scaled linearly with the total batch (Goyal et al., 2017)
    total_batch, n = args.batch_size_per_gpu * world, len(loader)
    schedules = (cosine_scheduler(args.lr * total_batch / 256, args.min_lr, args.epochs, n,
                                  args.warmup_epochs),
                 cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, n),
                 cosine_scheduler(args.momentum_teacher, 1, args.epochs, n),
                 None if args.weight_decay_last_layer is None else  # the prototypes' own decay
                 cosine_scheduler(args.weight_decay, args.weight_decay_last_layer, args.epochs, n))

    run_state = koleo_proto.resume_run(args, rank, load_checkpoint, SHAPE_FLAGS,
                                       student_without_ddp, teacher, optimizer,
                                       {"dino_loss": dino_loss, "fp16_scaler": scaler}, say)
    if args.init and not run_state["resumed"]:
        init_from(args, student_without_ddp, teacher, optimizer, dino_loss, say)
    eval_sets = koleo_proto.eval_datasets(args)
    if not run_state["resumed"]:  # the baseline the training must beat: kNN of the teacher now
        run_state["knn_top1_init"] = koleo_proto.knn_eval(
            args, teacher, eval_sets, indices, device, amp_dtype, pixels=False)["knn_top1"]
        if run_state["knn_top1_init"] is not None:
            say(f"kNN top-1 of the {'starting' if args.init else 'untrained'} teacher: "
                f"{run_state['knn_top1_init']:.2f}%")

    for epoch in range(run_state["epoch"], args.epochs):
        koleo_proto.reseed(args, loader, epoch, rank)
        t0 = time.time()
        stats, usage = train_one_epoch(student, teacher, student_without_ddp, dino_loss, loader,
                                       optimizer, schedules, epoch, scaler, amp_dtype, args,
                                       device, rank)
        elapsed = time.time() - t0
        run_state.update(epoch=epoch + 1, seconds=run_state["seconds"] + elapsed)
        if rank == 0:
            stats = dict(epoch=epoch + 1, **stats, **prototype_stats(teacher, student_without_ddp,
                                                                     usage),
                         images_per_s=n * total_batch / elapsed, seconds=run_state["seconds"])
            state = koleo_proto.training_state(args, run_state, student_without_ddp, teacher,
                                               optimizer, scaler, dino_loss=dino_loss)
            koleo_proto.save_epoch(args, state, stats, f"dino.py --data {args.data}")
            say(f"epoch {epoch + 1}/{args.epochs}  loss {stats['loss']:.4f}  unique prototypes "
                f"{stats['unique_prototypes']}/{args.out_dim} (student "
                f"{stats['unique_prototypes_student']})  used {stats['usage_used']}  teacher "
                f"entropy {stats['teacher_entropy']:.2f}  {stats['images_per_s']:.0f} img/s")

    # evaluation: kNN on teacher CLS features, raw-pixel kNN on the same split, collapse
    summary = koleo_proto.knn_eval(args, teacher, eval_sets, indices, device, amp_dtype)
    if rank == 0:
        final = prototype_stats(teacher, student_without_ddp, None)
        koleo_proto.write_summary(args, summary, run_state, len(indices), final, say)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    koleo_proto.run(main, "dino.py")
