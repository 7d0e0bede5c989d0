"""Train a demo teacher (rectified flow, label or prompt dropout for CFG). Seeded and resumable.

    python -m xslim_demo.train --run-dir runs/teacher [--minutes 30] [--config train_config.json]
    python -m xslim_demo.train --run-dir runs/teacher --export   # EMA weights -> weights/
    python -m xslim_demo.train --teacher text --run-dir runs/text-teacher   # the SD3-shaped text teacher

``--teacher class`` (default): the HunyuanVideo-shaped class-conditional demo teacher (xslim_demo/teacher.py);
``--teacher text``: the SD3-shaped teacher with its tiny text encoder, trained on random class prompts
(xslim_demo/text_teacher.py). Both train the same way; a recipe supplies the model, its conditioning and files.

A checkpoint (model, EMA, optimiser moments, step, data cursor, RNG state) is written atomically every
``checkpoint_every`` steps as safetensors; running the same command again continues from it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from . import teacher as class_teacher
from . import text_teacher
from .data import load_split
from .latents import image_to_latent

CONFIG_PATH = os.path.join(os.path.dirname(__file__), "train_config.json")
TEXT_CONFIG_PATH = os.path.join(os.path.dirname(__file__), "train_text_config.json")


class Recipe(Protocol):
    """What differs between the demo teachers: the modules, the conditioning inputs, the latent layout, files."""

    config_path: str
    default_out: str

    def build(self) -> tuple[torch.nn.Module, torch.nn.Module]: ...  # (transformer, conditioner)

    def inputs(self, labels: torch.Tensor, dropped: torch.Tensor, gen: torch.Generator) -> torch.Tensor: ...

    def latents(self, images: torch.Tensor) -> torch.Tensor: ...

    def velocity(self, model, cond, x: torch.Tensor, sigma, inputs: torch.Tensor) -> torch.Tensor: ...

    def preview(self, model, cond, path: str) -> None: ...

    def export(self, path: str, model, cond, meta: dict) -> None: ...


class ClassRecipe:
    """The HunyuanVideo-shaped class-conditional teacher: a learned table row per class, the last row the null."""

    config_path, default_out = CONFIG_PATH, class_teacher.default_weights_path()

    def build(self):
        return class_teacher.build_model(), class_teacher.ClassConditioner()

    def inputs(self, labels, dropped, gen):
        return torch.where(dropped, torch.full_like(labels, len(class_teacher.CLASSES)), labels)

    def latents(self, images):
        return image_to_latent(images)

    def velocity(self, model, cond, x, sigma, inputs):
        return class_teacher.velocity(model, cond, x, sigma, inputs)

    def preview(self, model, cond, path):
        from .grid import sample_grid

        sample_grid(model, cond, path, steps=20)

    def export(self, path, model, cond, meta):
        class_teacher.save_teacher(path, model, cond, meta)


class TextRecipe:
    """The SD3-shaped text teacher: a random prompt per image ("a photo of a sneaker"), the empty prompt dropped in."""

    config_path, default_out = TEXT_CONFIG_PATH, text_teacher.default_weights_path()

    def __init__(self):
        self.vocab = text_teacher.vocabulary()

    def build(self):
        return text_teacher.build_model(), text_teacher.TinyTextEncoder(len(self.vocab))

    def inputs(self, labels, dropped, gen):
        prompts = ["" if d else text_teacher.class_prompt(int(y), gen) for y, d in zip(labels, dropped)]
        return text_teacher.tokenize(prompts, self.vocab)

    def latents(self, images):
        return image_to_latent(images).squeeze(2)

    def velocity(self, model, cond, x, sigma, inputs):
        return text_teacher.velocity(model, cond, x, sigma, inputs)

    def preview(self, model, cond, path):
        text_teacher.prompt_grid(text_teacher.TextTeacher(model, cond, self.vocab, {}), path, steps=20)

    def export(self, path, model, cond, meta):
        text_teacher.save_text_teacher(path, model, cond, self.vocab, meta)


RECIPES: dict[str, type] = {"class": ClassRecipe, "text": TextRecipe}


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    hflip: bool = True
    total_steps: int = 2500
    lr_decay_start: int = 1700  # linear decay from here to lr_final at total_steps
    lr_final: float = 1e-4
    checkpoint_every: int = 50
    preview_every: int = 250

    @classmethod
    def load(cls, path: str) -> "TrainConfig":
        with open(path) as f:
            return cls(**json.load(f))


class Trainer:
    def __init__(self, config: TrainConfig, run_dir: str, recipe: Recipe | None = None):
        self.cfg, self.run_dir, self.recipe = config, run_dir, recipe or ClassRecipe()
        os.makedirs(run_dir, exist_ok=True)
        torch.manual_seed(config.seed)
        model, self.cond = self.recipe.build()
        self.model = model.train()
        self.ema_model, self.ema_cond = copy.deepcopy(self.model).eval(), copy.deepcopy(self.cond)
        for p in list(self.ema_model.parameters()) + list(self.ema_cond.parameters()):
            p.requires_grad_(False)
        self.params = list(self.model.parameters()) + list(self.cond.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.0)
        self.step, self.cursor = 0, 0
        self.gen = torch.Generator().manual_seed(config.seed)
        self.images, self.labels = load_split("train")
        self.order = torch.randperm(len(self.images), generator=self.gen)

    # -- checkpointing: safetensors only ---------------------------------------------------------------
    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.run_dir, "checkpoint.safetensors")

    def save(self) -> None:
        tensors = {}
        for prefix, module in (
            ("model", self.model),
            ("cond", self.cond),
            ("ema_model", self.ema_model),
            ("ema_cond", self.ema_cond),
        ):
            tensors.update({f"{prefix}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()})
        for i, p in enumerate(self.params):
            st = self.opt.state.get(p)
            if st:
                tensors[f"opt.{i}.exp_avg"], tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg"], st["exp_avg_sq"]
                tensors[f"opt.{i}.step"] = st["step"].reshape(1).float()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.data"] = self.gen.get_state()
        tensors["data.order"] = self.order
        meta = {"step": str(self.step), "cursor": str(self.cursor), "config": json.dumps(asdict(self.cfg))}
        tmp = self.ckpt_path + ".tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, self.ckpt_path)

    def resume(self) -> bool:
        if not os.path.exists(self.ckpt_path):
            return False
        with safe_open(self.ckpt_path, framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata()
        for prefix, module in (
            ("model", self.model),
            ("cond", self.cond),
            ("ema_model", self.ema_model),
            ("ema_cond", self.ema_cond),
        ):
            module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in t.items() if k.startswith(prefix + ".")})
        for i, p in enumerate(self.params):
            if f"opt.{i}.exp_avg" in t:
                self.opt.state[p] = {
                    "exp_avg": t[f"opt.{i}.exp_avg"],
                    "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"],
                    "step": t[f"opt.{i}.step"].reshape(()),
                }
        torch.set_rng_state(t["rng.torch"])
        self.gen.set_state(t["rng.data"])
        self.order = t["data.order"]
        self.step, self.cursor = int(meta["step"]), int(meta["cursor"])
        return True

    # -- one step --------------------------------------------------------------------------------------
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.cfg.batch_size
        if self.cursor + b > len(self.order):
            self.order, self.cursor = torch.randperm(len(self.images), generator=self.gen), 0
        idx = self.order[self.cursor : self.cursor + b]
        self.cursor += b
        images, labels = self.images[idx], self.labels[idx].clone()
        if self.cfg.hflip:
            flip = torch.rand(b, generator=self.gen) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        dropped = torch.rand(b, generator=self.gen) < self.cfg.label_dropout
        return self.recipe.latents(images), self.recipe.inputs(labels, dropped, self.gen)

    def train_step(self) -> float:
        x0, labels = self.batch()
        sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=self.gen))  # logit-normal noise levels
        noise = torch.randn(x0.shape, generator=self.gen)
        s = sigma.reshape(-1, *([1] * (x0.dim() - 1)))
        xt = (1 - s) * x0 + s * noise
        pred = self.recipe.velocity(self.model, self.cond, xt, sigma, labels)
        loss = F.mse_loss(pred, noise - x0)
        lr = self.learning_rate()
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.update_ema(min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step)))  # warm-up: early EMA follows
        self.step += 1
        return loss.item()

    def learning_rate(self) -> float:
        cfg = self.cfg
        warm = min(1.0, (self.step + 1) / cfg.warmup_steps)
        if self.step < cfg.lr_decay_start:
            return cfg.lr * warm
        frac = min(1.0, (self.step - cfg.lr_decay_start) / max(1, cfg.total_steps - cfg.lr_decay_start))
        return cfg.lr + (cfg.lr_final - cfg.lr) * frac

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        for ema, live in ((self.ema_model, self.model), (self.ema_cond, self.cond)):
            for pe, pl in zip(ema.parameters(), live.parameters()):
                pe.lerp_(pl, 1.0 - decay)

    def preview(self) -> None:
        self.recipe.preview(self.ema_model, self.ema_cond, os.path.join(self.run_dir, f"preview_{self.step:05d}.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument(
        "--teacher", choices=sorted(RECIPES), default="class", help="which demo teacher (default class)"
    )
    parser.add_argument("--config", default=None, help="training settings (default: the teacher's shipped config)")
    parser.add_argument("--minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    parser.add_argument("--export", action="store_true", help="write the EMA weights to the shipped location")
    parser.add_argument("--out", default=None, help="export path (default: the teacher's shipped location)")
    parser.add_argument("--reset-ema", action="store_true", help="restart the EMA from the live weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    recipe = RECIPES[args.teacher]()
    args.out = args.out or recipe.default_out
    trainer = Trainer(TrainConfig.load(args.config or recipe.config_path), args.run_dir, recipe)
    resumed = trainer.resume()
    if args.reset_ema:
        trainer.update_ema(0.0)
    if args.export:
        if not resumed:
            raise SystemExit(f"No checkpoint in {args.run_dir} to export.")
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        recipe.export(
            args.out,
            trainer.ema_model,
            trainer.ema_cond,
            {"training_steps": trainer.step, "ema_decay": trainer.cfg.ema_decay},
        )
        print(f"Exported the EMA weights after {trainer.step} steps to {args.out}")
        return 0
    cfg, start = trainer.cfg, time.time()
    bar = tqdm(total=cfg.total_steps, initial=trainer.step, desc=f"demo {args.teacher} teacher", unit="step")
    ema_loss = None
    while trainer.step < cfg.total_steps:
        loss = trainer.train_step()
        if not math.isfinite(loss):
            raise SystemExit(f"Non-finite loss at step {trainer.step}; the last checkpoint is kept.")
        ema_loss = loss if ema_loss is None else 0.98 * ema_loss + 0.02 * loss
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.4f}")
        done = args.minutes is not None and time.time() - start > args.minutes * 60
        if trainer.step % cfg.checkpoint_every == 0 or done or trainer.step == cfg.total_steps:
            trainer.save()
            with open(os.path.join(args.run_dir, "log.jsonl"), "a") as f:
                f.write(
                    json.dumps({"step": trainer.step, "loss_ema": ema_loss, "elapsed_s": time.time() - start}) + "\n"
                )
        if trainer.step % cfg.preview_every == 0:
            trainer.preview()
        if done:
            break
    bar.close()
    print(f"Stopped at step {trainer.step}; checkpoint {trainer.ckpt_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
