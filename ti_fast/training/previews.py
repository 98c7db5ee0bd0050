"""Training previews: every --preview-every steps an image from what is being trained (fixed seed,
so previews compare across steps), a grid of all previews so far, and with --png-embed an
A1111-loadable image embedding named NAME-STEP. Every PNG carries A1111 infotext, with
`TI hashes: "NAME: HASH"` (the hash of the NAME.pt the run would write at that step). A
hypernetwork's previews sample with it attached at strength 1 in eval mode (dropout off), and
their infotext prompt carries `<hypernet:NAME:1>`, so A1111 reproduces them from NAME.pt. Previews
draw from their own CPU generators and run under no_grad: the training RNG and the trained
values are untouched (bitwise-same training with previews on or off)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from ..diffusion import samplers as S
from ..diffusion.conditioning import grey_latent, inpaint_concat
from ..diffusion.sampling import sample_images, to_pil
from ..embeddings.formats import pt_shorthash
from ..embeddings.png import CHUNK_KEY, embedding_chunk_text, embedding_to_png
from ..infotext import VERSION, make_infotext, write_png_with_infotext


class Previewer:
    """model: the loaded SDModel; plan: the run's Plan; ptok: the prompt tokenizer knowing the
    trigger word; prompt: the default prompt (a training prompt) when --preview-prompt is unset."""

    def __init__(self, model, plan, ptok, device, prompt: str):
        self.model, self.plan, self.cfg, self.ptok, self.device = model, plan, plan.cfg, ptok, device
        self.images_dir = plan.log_dir / "images"
        self.embed_dir = plan.log_dir / "image_embeddings"
        self.prompt = self.cfg.preview_prompt or prompt
        self.tiles: list[tuple[int, Image.Image]] = []
        self.c_concat = None
        if model.unet.config.in_channels == 9:
            vae = model.vae
            home = vae.quant_conv.weight.device
            vae.to(device)
            self.c_concat = inpaint_concat(grey_latent(vae, self.cfg.height, self.cfg.width, device))
            vae.to(home)

    def __call__(self, step: int, trainable) -> Path:
        cfg, m, name = self.cfg, self.model, self.plan.name
        was = m.unet.training
        with trainable.previewing():
            imgs, _ = sample_images(m, self.ptok, trainable.preview_vectors(), self.prompt, cfg.preview_negative,
                                    sampler=self.plan.preview_sampler, steps=cfg.preview_steps, cfg=cfg.preview_cfg,
                                    seeds=[cfg.preview_seed], width=cfg.width, height=cfg.height,
                                    clip_skip=cfg.clip_skip, c_concat=self.c_concat, decode_device=self.device)
        m.unet.train(was)
        img = to_pil(imgs)[0]
        embedding = trainable.kind == "embedding"
        state = trainable.state_dict() if embedding else None
        prompt = self.prompt if embedding else f"{self.prompt} <hypernet:{name}:1>"
        info = make_infotext(prompt, cfg.preview_negative, steps=cfg.preview_steps,
                             sampler=S.SAMPLERS[self.plan.preview_sampler].label,
                             schedule_type=S.schedule_label(self.plan.preview_sampler, None), cfg_scale=cfg.preview_cfg,
                             seed=cfg.preview_seed, width=cfg.width, height=cfg.height,
                             model_hash=m.info.hash, model_name=m.info.name, clip_skip=cfg.clip_skip,
                             ti_hashes={name: pt_shorthash(trainable.embedding(state, step))} if embedding else None,
                             version=VERSION)
        path = self.images_dir / f"{name}-{step}.png"
        write_png_with_infotext(img, path, info)
        self.tiles.append((step, img))
        self.write_grid(info)
        if cfg.png_embed and embedding:
            named = trainable.embedding(state, step, trainable.periodic_name(step))
            write_png_with_infotext(embedding_to_png(named, img), self.embed_dir / f"{named.name}.png", info,
                                    extra_chunks={CHUNK_KEY: embedding_chunk_text(named)})
        return path

    def write_grid(self, infotext: str) -> Path:
        """images/NAME-grid.png: every preview so far, in step order, labelled with its step."""
        n = len(self.tiles)
        cols = min(n, 8)
        rows = (n + cols - 1) // cols
        w, h = self.tiles[0][1].size
        grid = Image.new("RGB", (cols * w, rows * (h + 14)), "white")
        d = ImageDraw.Draw(grid)
        for i, (step, img) in enumerate(self.tiles):
            x, y = (i % cols) * w, (i // cols) * (h + 14)
            grid.paste(img, (x, y + 14))
            d.text((x + 2, y + 1), f"step {step}", fill="black")
        return write_png_with_infotext(grid, self.images_dir / f"{self.plan.name}-grid.png", infotext)

