"""Train the toy world's model from scratch on one GPU, across calls of at most ~10 minutes.

    # call 1: render scenes, train the VAE and the oracle, then the UNet + text encoder
    python -m bench.toyworld.train --out $OUT --compile --minutes 9 --total-minutes 14 --call-minutes 9.5
    # call 2, on the same warm machine: continue from the checkpoint call 1 kept in /tmp
    python -m bench.toyworld.train --out $OUT --compile --resume /tmp/toyck/checkpoint.pt --minutes 9 --total-minutes 14 --call-minutes 8.2

Each call keeps `--checkpoint-dir` (default /tmp/toyck: the device copies the repository afresh
for every call, but its /tmp survives while the machine stays warm) with `checkpoint.pt`
(weights, EMA weights, AdamW state, step counts) and `model` (the EMA model as a diffusers
folder, fp16). It writes `$OUT/model.tar` (that folder in one file; split it to bring it back),
`$OUT/oracle.pt` (first call), `$OUT/samples.png` and `$OUT/log.json`. The learning rate follows
a cosine over `--total-minutes` of UNet training summed over calls. A checkpoint without AdamW
state continues from the EMA weights with a short warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.toyworld import model as toy
from bench.toyworld.oracle import OracleNet, label_maps, oracle_loss
from bench.toyworld.world import caption, random_scene, render, with_random_bellies

CAPTIONS_PER_SCENE = 4  # training-time caption variants (words dropped at random)
EVAL_PROMPTS = [
    "a dog on the grass", "a cat on the beach", "a bird in the snow", "a red dog in the water",
    "a blue cat with yellow stripes at night", "a white bird with black spots on the grass",
    "a dog and a cat on the grass", "a green dog, a pink cat and an orange bird on the beach",
]


def _render_chunk(args):
    seed, count, with_labels = args
    rng = np.random.default_rng(seed)
    belly_rng = np.random.default_rng([*seed, 7])  # its own stream: the base scenes stay as they were
    images, captions, labels = [], [], []
    for _ in range(count):
        scene = random_scene(rng)
        if with_labels:  # the oracle's scenes: it must read bellies, which base scenes never have
            scene = with_random_bellies(scene, belly_rng)
        image, instance = render(scene)
        images.append(image)
        captions.append([caption(scene, rng) for _ in range(CAPTIONS_PER_SCENE)])
        if with_labels:
            labels.append(label_maps(scene, instance).astype(np.int8))
    return np.stack(images), captions, (np.stack(labels) if with_labels else None)


def render_dataset(count: int, seed: int, with_labels: bool = False, workers: int | None = None):
    """`count` random scenes: uint8 images `[N, 64, 64, 3]`, caption variants, optional label maps."""
    workers = workers or os.cpu_count()
    chunk = 1000
    jobs = [((seed, i), min(chunk, count - i * chunk), with_labels) for i in range((count + chunk - 1) // chunk)]
    with Pool(workers) as pool:
        parts = pool.map(_render_chunk, jobs)
    images = np.concatenate([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    labels = np.concatenate([p[2] for p in parts]) if with_labels else None
    return images, captions, labels


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 `[B, H, W, 3]` -> float `[B, 3, H, W]` in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def cosine_lr(base_lr: float, progress: float, warmup: float) -> float:
    if progress < warmup:
        return base_lr * progress / warmup
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def train_vae(vae, images_gpu: torch.Tensor, steps: int, batch: int, log: dict) -> None:
    """Reconstruction (L1 + L2) with a small KL term, as SD's autoencoder minus the GAN and LPIPS."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(1e-3, step / steps, 0.05)
        idx = torch.randint(0, len(images_gpu), (batch,), device=images_gpu.device)
        x = to_model_range(images_gpu[idx])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        kl = posterior.kl().mean() / x[0].numel()
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"vae step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    vae.eval()
    log["vae"] = {"steps": steps, "batch": batch, "seconds": round(time.time() - start, 1), "final_loss": round(loss.item(), 5)}


@torch.no_grad()
def encode_latents(vae, images_gpu: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """Posterior means of every image and of its mirror image: `[2N, 4, 16, 16]`."""
    out = []
    for flip in (False, True):
        for i in range(0, len(images_gpu), batch):
            x = to_model_range(images_gpu[i:i + batch])
            if flip:
                x = x.flip(-1)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out.append(vae.encode(x).latent_dist.mean.float())
    return torch.cat(out)


def train_oracle(vae, device, steps: int, log: dict, scenes: int, batch: int = 256) -> OracleNet:
    """The oracle on its own scenes (another seed), half of each batch passed through the VAE."""
    images, _, labels = render_dataset(scenes, seed=1, with_labels=True)
    images = torch.from_numpy(images).to(device)
    labels = torch.from_numpy(labels).to(device)
    net = OracleNet().to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(2e-3, step / steps, 0.05)
        idx = torch.randint(0, len(images), (batch,), device=device)
        x, y = to_model_range(images[idx]), labels[idx].long()
        flip = torch.rand(len(x), device=device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = torch.where(flip[:, None, None, None], y.flip(-1), y)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            recon = vae.decode(vae.encode(x[:batch // 2]).latent_dist.sample()).sample.float().clamp(-1, 1)
        x = torch.cat([recon, x[batch // 2:]])
        x = x + 0.03 * torch.randn_like(x) * torch.rand(len(x), 1, 1, 1, device=device)  # sampler noise
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = oracle_loss(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"oracle step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    log["oracle"] = {"steps": steps, "scenes": scenes, "seconds": round(time.time() - start, 1), "final_loss": round(loss.item(), 5)}
    return net.eval()


class EMA:
    """Exponential moving average of a module's parameters, updated by one fused foreach call."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.params = list(module.parameters())
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.names = [name for name, _ in module.named_parameters()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, self.params, 1 - decay)

    def state_dict(self, module: nn.Module) -> dict:
        """The module's state dict with the averaged parameters in place of the trained ones."""
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        state.update(zip(self.names, self.shadow))
        return state


def train_denoiser(unet, text_encoder, latents, token_ids, state: dict, minutes: float, total_minutes: float,
                   batch: int, log: dict, compile_unet: bool = False, resume: dict | None = None) -> tuple[EMA, EMA, dict]:
    """Epsilon prediction on SD1.5's noise schedule; text encoder trained jointly; 10% empty captions."""
    from diffusers import DDPMScheduler

    device = latents.device
    schedule = DDPMScheduler(**toy.SCHEDULE)
    alphas = schedule.alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.99), weight_decay=0.01, fused=True)
    ema_unet, ema_text = EMA(unet, 0.9995), EMA(text_encoder, 0.9995)
    if resume and "optimizer" in resume:  # a checkpoint kept on the same machine: the exact state
        optimizer.load_state_dict(resume["optimizer"])
        for ema, key in ((ema_unet, "unet"), (ema_text, "text_encoder")):
            for shadow, name in zip(ema.shadow, ema.names):
                shadow.copy_(resume[key][name])
    empty_ids = token_ids[0, 0].clone()
    empty_ids[1:] = text_encoder.config.eos_token_id  # "" -> <start> <end> <pad>...
    unet.train()
    text_encoder.train()
    forward = unet
    if compile_unet:
        forward = torch.compile(unet)  # many small kernels at 16x16: fusing them is most of the speed
    n_images = token_ids.shape[0]
    start, step0 = time.time(), state["step"]
    seconds0 = state["seconds"]
    exact_resume = bool(resume and "optimizer" in resume)
    step = step0
    while time.time() - start < minutes * 60:
        progress = (seconds0 + time.time() - start) / (total_minutes * 60)
        lr = cosine_lr(5e-4, progress, 0.03)
        if step0 > 0 and not exact_resume:  # fresh AdamW moments: warm up again
            lr *= min(1, (step - step0) / 200)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(latents), (batch,), device=device)
        x0 = (latents[idx] * state["scaling_factor"]).contiguous(memory_format=torch.channels_last)
        variant = torch.randint(0, token_ids.shape[1], (batch,), device=device)
        ids = token_ids[idx % n_images, variant]
        ids = torch.where((torch.rand(batch, device=device) < 0.1)[:, None], empty_ids, ids)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast("cuda", dtype=torch.bfloat16):
            context = text_encoder(ids).last_hidden_state
            try:
                pred = forward(xt, t, context).sample
            except Exception as error:  # a compiler failure must not cost the call: go on eagerly
                if forward is unet:
                    raise
                print(f"torch.compile failed ({type(error).__name__}: {error}); training eagerly", flush=True)
                forward = unet
                pred = forward(xt, t, context).sample
        loss = ((pred.float() - noise) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_unet.update(step)
        ema_text.update(step)
        if step % 1000 == 0:
            rate = (step - step0) / max(time.time() - start, 1e-9)
            print(f"unet step {step} loss {loss.item():.4f} lr {lr:.2e} ({time.time() - start:.0f} s, {rate:.1f} steps/s)", flush=True)
        step += 1
    state["seconds"] = seconds0 + time.time() - start
    state["step"] = step
    log.setdefault("unet_calls", []).append({"steps": step - step0, "batch": batch, "seconds": round(time.time() - start, 1),
                                             "last_loss": round(loss.item(), 5)})
    return ema_unet, ema_text, optimizer.state_dict()


def tokenize(tokenizer, captions: list[list[str]]) -> torch.Tensor:
    flat = [c for variants in captions for c in variants]
    ids = tokenizer(flat, padding="max_length", max_length=toy.MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    return ids.view(len(captions), CAPTIONS_PER_SCENE, -1)


@torch.no_grad()
def sample_grid(folder: Path, path: Path, device) -> None:
    """Four seeds of each evaluation prompt through the product's own sampler."""
    from PIL import Image

    from pipelines.base import load_base
    from pipelines.sample import SampleConfig, generate

    base = load_base(str(folder), device=str(device))
    rows = []
    for prompt in EVAL_PROMPTS:
        images = generate(base, None, SampleConfig(prompt=prompt, negative_prompt="", steps=25, guidance=5.0, seed=0, num_images=4)).images
        rows.append(np.concatenate([np.asarray(im) for im in images], 1))
    Image.fromarray(np.concatenate(rows, 0)).resize((4 * 128, len(rows) * 128), Image.NEAREST).save(path)


def retrain_oracle(args, out: Path, device: torch.device) -> None:
    from diffusers import AutoencoderKL

    from bench.toyworld.evaluate import MODEL_DIR

    log = {"command": " ".join(["python -m bench.toyworld.train"] + os.sys.argv[1:]),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    vae = AutoencoderKL.from_pretrained(MODEL_DIR / "vae").float().to(device).eval()
    oracle = train_oracle(vae, device, args.oracle_steps, log, args.oracle_scenes, args.oracle_batch)
    torch.save(oracle.state_dict(), out / "oracle.pt")
    (out / "oracle_log.json").write_text(json.dumps(log, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", help="checkpoint.pt of an earlier call")
    parser.add_argument("--minutes", type=float, default=8.5, help="UNet training time in this call, at most")
    parser.add_argument("--call-minutes", type=float, default=9.3,
                        help="wall time of the whole call; UNet training stops early to leave 45 s for saving")
    parser.add_argument("--total-minutes", type=float, default=17, help="UNet training time over all calls (lr schedule)")
    parser.add_argument("--scenes", type=int, default=120_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--oracle-steps", type=int, default=3000)
    parser.add_argument("--oracle-scenes", type=int, default=30_000)
    parser.add_argument("--oracle-batch", type=int, default=256)
    parser.add_argument("--checkpoint-dir", default="/tmp/toyck", help="where checkpoint.pt and the model folder go")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet for training")
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke run of the script")
    parser.add_argument("--oracle-only", action="store_true",
                        help="retrain only the oracle, against the VAE of assets/toyworld/model, into $OUT/oracle.pt")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if args.oracle_only:
        retrain_oracle(args, out, device)
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    log = {"command": " ".join(["python -m bench.toyworld.train"] + [a for a in os.sys.argv[1:]]),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    started = time.time()

    tok_dir = out / "tokenizer"
    toy.write_tokenizer(tok_dir)
    tokenizer, text_encoder, unet, vae = toy.build(tok_dir)
    state = {"step": 0, "seconds": 0.0, "scaling_factor": 1.0}
    if args.resume:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=True)
        unet.load_state_dict(checkpoint.get("raw_unet", checkpoint["unet"]))
        text_encoder.load_state_dict(checkpoint.get("raw_text_encoder", checkpoint["text_encoder"]))
        vae.load_state_dict(checkpoint["vae"])
        state = checkpoint["state"]
        log = {**checkpoint["log"], **{k: log[k] for k in ("command", "device")}}
    unet, text_encoder, vae = unet.to(device), text_encoder.to(device), vae.to(device)
    unet.to(memory_format=torch.channels_last)
    vae.to(memory_format=torch.channels_last)

    images, captions, _ = render_dataset(args.scenes, seed=0)
    print(f"rendered {len(images)} scenes in {time.time() - started:.0f} s", flush=True)
    images_gpu = torch.from_numpy(images).to(device)
    if not args.resume:
        train_vae(vae, images_gpu, args.vae_steps, 128, log)
        oracle = train_oracle(vae, device, args.oracle_steps, log, args.oracle_scenes, args.oracle_batch)
        torch.save(oracle.state_dict(), out / "oracle.pt")
    latents = encode_latents(vae, images_gpu)
    if not args.resume:
        state["scaling_factor"] = float(1 / latents.std())
        vae.register_to_config(scaling_factor=state["scaling_factor"])
        log["latent_std"] = round(float(latents.std()), 4)
    del images_gpu
    token_ids = tokenize(tokenizer, captions).to(device)

    minutes = min(args.minutes, args.call_minutes - (time.time() - started + 45) / 60)
    ema_unet, ema_text, optimizer_state = train_denoiser(unet, text_encoder, latents, token_ids, state, minutes,
                                        args.total_minutes, args.batch, log, args.compile,
                                                         checkpoint if args.resume else None)
    raw = {"raw_unet": {k: v.detach().clone() for k, v in unet.state_dict().items()},
           "raw_text_encoder": {k: v.detach().clone() for k, v in text_encoder.state_dict().items()},
           "optimizer": optimizer_state}
    unet.load_state_dict(ema_unet.state_dict(unet))
    text_encoder.load_state_dict(ema_text.state_dict(text_encoder))
    unet.eval()
    text_encoder.eval()
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    log["state"] = state
    log["total_seconds_this_call"] = round(time.time() - started, 1)
    keep = Path(args.checkpoint_dir)
    keep.mkdir(parents=True, exist_ok=True)
    torch.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "vae": vae.state_dict(),
                "state": state, "log": log, **raw}, keep / "checkpoint.pt")
    card = {"what": "toy-world text-to-image model, trained from scratch (bench/toyworld)", "unet_steps": state["step"],
            "unet_minutes": round(state["seconds"] / 60, 2), "batch": args.batch, "scenes": args.scenes, "log": log}
    toy.save(keep / "model", tokenizer, text_encoder.cpu(), unet.cpu(), vae.cpu(), card)
    shutil.make_archive(str(out / "model"), "tar", keep, "model")  # one file: what comes back from the device
    sample_grid(keep / "model", out / "samples.png", device)
    (out / "log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
