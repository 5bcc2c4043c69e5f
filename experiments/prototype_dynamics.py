"""Why do the prototypes of a dino.py run collapse, or not? The two mechanisms, measured on checkpoints.

Partial prototype collapse (Govindarajan et al., BMVC 2024) needs the prototypes to move, and to
move together. Two forces can do it:
  1. prototypes that serve the same cluster get the same soft assignments from the teacher and are
     pulled to the same centre (the shortcut to a uniform marginal);
  2. prototypes the teacher never picks get the gradient sum_i p_s,k(i) y_i / tau_s: they are pushed
     away from the data, all in about the same direction.
Neither can act if the bottleneck features y do not spread (they then span a few directions, and
the prototypes' other coordinates get no gradient) or if the gradients are noise (AdamW then turns
them into a random walk of the same size in every coordinate). For each checkpoint this prints:
  features    ‖mean y‖: resultant length of the teacher's L2-normalized bottleneck outputs on the
              evaluation images (1 = all the same direction); PR: participation ratio of their
              covariance (the effective number of directions they vary in)
  teacher     entropy of its centred, sharpened targets (ln K = uniform), entropy of the targets'
              mean (the marginal), how many prototypes win the argmax on some image
  prototypes  unique at eps 0.025 / 0.1 / 0.3, the KoLeo value (-mean log nearest-neighbour
              distance), the mean cosine between the prototypes and the mean feature
  gradients   the student's gradient on the prototypes over --batches training batches at the
              checkpoint's state. For the prototypes the teacher picks (marginal mass >= 1/K) and the
              others: per-coordinate |mean g| / std g (pure noise gives about 0.8 / sqrt(batches));
              and for the others the resultant length of their unit mean gradients (1 = all are
              pushed the same way: mechanism 2)
  optimizer   from the checkpoint's AdamW state: the mean per-coordinate size of its last step on
              the prototypes, in units of the learning rate (|m_hat| / sqrt(v_hat); 1 = a steady
              gradient moved at full speed), for the picked prototypes and the others. Far below 1
              means the gradient has shrunk below what AdamW's second moment (beta2 = 0.999, a
              memory of ~1,000 steps) remembers: the motion is paced by that memory, not by the lr;
              and the median ||weight_v|| of the student's prototypes: a step of AdamW turns a
              prototype by about its size / ||weight_v||, so weight decay, which shrinks it, speeds them up
Runs:
  python experiments/prototype_dynamics.py runs/dino-fashion-mnist/checkpoint0001.pth runs/dino-fashion-mnist/checkpoint.pth
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dino  # noqa: E402  (the repository's root is put on the path first)
import koleo_proto  # noqa: E402


def load(path):
    """Student, teacher and DINOLoss (with its centre) as they were when the checkpoint was written."""
    ckpt = dino.load_checkpoint(path)
    args = ckpt["args"]
    student, teacher = dino.build_models(args)
    student.load_state_dict(koleo_proto.strip_prefix(ckpt["student"]))
    teacher.load_state_dict(ckpt["teacher"])
    loss = dino.DINOLoss(args.out_dim, 2 + args.local_crops_number, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs, vmf_dim=args.bottleneck_dim if args.vmf else None)
    loss.load_state_dict(ckpt["dino_loss"])
    return args, student.eval(), teacher.eval(), loss, ckpt["epoch"], ckpt.get("optimizer")


def adam_step_stats(args, student, optimizer_state, picked):
    """Size of AdamW's last step on the prototypes per coordinate, in units of the lr (weight decay
    aside), and the median ||weight_v|| that step is divided by to turn a prototype."""
    weight_v = student.head.last_layer.weight_v
    stats = {"adam_step_picked": math.nan, "adam_step_others": math.nan,
             "weight_v_norm": weight_v.norm(dim=1).median().item()}
    groups = dino.get_params_groups(student, getattr(args, "weight_decay_last_layer", None))
    params = [q for group in groups for q in group["params"]]  # the optimizer's order
    index = next(i for i, q in enumerate(params) if q is weight_v)
    state = (optimizer_state or {}).get("state", {}).get(index)
    if not state or "exp_avg_sq" not in state:  # SGD, or no step taken yet
        return stats
    group = next(g for g in optimizer_state["param_groups"] if index in g["params"])
    (beta1, beta2), step = group["betas"], float(state["step"])
    m_hat = state["exp_avg"] / (1 - beta1 ** step)
    v_hat = state["exp_avg_sq"] / (1 - beta2 ** step)
    size = (m_hat.abs() / (v_hat.sqrt() + group["eps"])).mean(dim=1)  # (K,)
    if picked.any():
        stats["adam_step_picked"] = size[picked].mean().item()
    if (~picked).any():
        stats["adam_step_others"] = size[~picked].mean().item()
    return stats


def norms(args, student, teacher):
    if not args.vmf:
        return {}
    return dict(student_norms=student.head.last_layer.weight_g.squeeze(1).abs(),
                teacher_norms=teacher.head.last_layer.weight_g.squeeze(1).abs())


@torch.no_grad()
def feature_and_teacher_stats(args, teacher, loss, epoch, images):
    y = F.normalize(teacher.head.mlp(teacher.backbone(images)), dim=-1)  # (N, D) on the unit sphere
    mean = y.mean(dim=0)
    eig = torch.linalg.eigvalsh(torch.cov(y.T).double()).clamp(min=0)
    w = teacher.head.last_layer.weight
    # the teacher's targets as DINOLoss makes them; its centre is put back, the gradients need it
    center = loss.center.clone()
    logits = teacher.head.last_layer(y)  # (N, K)
    loss(logits.repeat(loss.ncrops, 1), logits.repeat(2, 1), epoch - 1, **norms(args, teacher, teacher))
    q, loss.center = loss.teacher_probs[:len(y)], center  # (N, K)
    marginal = q.mean(dim=0)
    curve = dict(koleo_proto.unique_prototype_curve(w, (0.025, 0.1, 0.3)))
    return {"mean_resultant": mean.norm().item(), "participation_ratio": (eig.sum() ** 2 / (eig ** 2).sum()).item(),
            "teacher_entropy": -(q * torch.log(q + 1e-12)).sum(dim=1).mean().item(),
            "marginal_entropy": -(marginal * torch.log(marginal + 1e-12)).sum().item(),
            "argmax_used": koleo_proto.usage_stats(koleo_proto.assignment_histogram(q))["used"],
            "unique": [curve[0.025], curve[0.1], curve[0.3]], "koleo": koleo_proto.koleo_proto_loss(w).item(),
            "cos_prototype_mean_feature": (F.normalize(w, dim=1) @ F.normalize(mean, dim=0)).mean().item()}, marginal


def gradient_stats(args, student, teacher, loss, epoch, batches, picked):
    """Per-coordinate signal-to-noise of the prototype gradients over the given batches of crops."""
    grads = []
    for crops in batches:
        student.zero_grad(set_to_none=True)
        with torch.no_grad():
            t = teacher(crops[:2])
        out = loss(student(crops), t, epoch - 1, **norms(args, student, teacher))
        out.backward()
        grads.append(student.head.last_layer.weight_v.grad.clone())
    g = torch.stack(grads)  # (n, K, D)
    snr = g.mean(dim=0).abs() / (g.std(dim=0) + 1e-30)  # (K, D)
    stats = {"snr_picked": snr[picked].mean().item() if picked.any() else math.nan,
             "snr_others": snr[~picked].mean().item() if (~picked).any() else math.nan,
             "snr_noise": math.sqrt(2 / math.pi) / math.sqrt(len(batches))}
    others = g.mean(dim=0)[~picked]
    stats["others_alignment"] = F.normalize(others, dim=1).mean(dim=0).norm().item() if len(others) else math.nan
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", help="dino.py checkpoints (e.g. the checkpointNNNN.pth of one run)")
    p.add_argument("--images", type=int, default=2000, help="evaluation images for the feature and teacher figures")
    p.add_argument("--batches", type=int, default=12, help="training batches for the gradient figures")
    p.add_argument("--batch_size", type=int, default=64, help="images per training batch")
    p.add_argument("--output", default=None, help="also write the rows as JSON here")
    args_cli = p.parse_args(argv)
    rows = []
    for path in args_cli.checkpoints:
        torch.manual_seed(0)  # the same images and crops for every checkpoint
        args, student, teacher, loss, epoch, optimizer_state = load(path)
        mean, std = koleo_proto.DATASETS[args.data]
        plain = koleo_proto.build_dataset(args, True, koleo_proto.eval_transform(args, mean, std))
        images = torch.stack([plain[i][0] for i in range(min(args_cli.images, len(plain)))])
        row, marginal = feature_and_teacher_stats(args, teacher, loss, epoch, images)
        augment = dino.DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                            args.global_crops_size, args.local_crops_size, mean, std)
        train = koleo_proto.build_dataset(args, True, augment)
        order = torch.randperm(len(train))[:args_cli.batches * args_cli.batch_size].view(args_cli.batches, -1)
        batches = []
        for idx in order:
            views = [train[int(i)][0] for i in idx]  # each a list of 2 + local_crops_number crops
            batches.append([torch.stack(c) for c in zip(*views)])  # per crop: (B, C, H, W)
        picked = marginal >= 1.0 / args.out_dim
        row.update(gradient_stats(args, student, teacher, loss, epoch, batches, picked))
        row.update(adam_step_stats(args, student, optimizer_state, picked))
        rows.append(dict(checkpoint=path, epoch=epoch, K=args.out_dim, **row))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| checkpoint | epoch | ‖mean y‖ | PR | teacher H | marginal H | argmax used | unique .025/.1/.3 "
          "| KoLeo | cos(w, mean y) | SNR picked | SNR others | noise | others aligned | step picked | step others | ‖v‖ |")
    print("|---" * 17 + "|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['epoch']} | {r['mean_resultant']:.2f} | {r['participation_ratio']:.1f} "
              f"| {r['teacher_entropy']:.2f} | {r['marginal_entropy']:.2f} | {r['argmax_used']} "
              f"| {'/'.join(map(str, r['unique']))} | {r['koleo']:.3f} | {r['cos_prototype_mean_feature']:.3f} "
              f"| {r['snr_picked']:.2f} | {r['snr_others']:.2f} | {r['snr_noise']:.2f} | {r['others_alignment']:.2f} "
              f"| {r['adam_step_picked']:.3f} | {r['adam_step_others']:.3f} | {r['weight_v_norm']:.2f} |")
    if args_cli.output:
        with open(args_cli.output, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
