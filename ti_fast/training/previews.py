"""Training previews: every --preview-every steps an image from the current vectors (fixed seed,
so previews compare across steps), a grid of all previews so far, and with --png-embed an
A1111-loadable image embedding. Previews draw from their own CPU generators and run under
no_grad: the training RNG and the vectors are untouched (bitwise-same training on or off)."""
from __future__ import annotations

from pathlib import Path

import torch



class Previewer:
    def __init__(self, model, cfg, name: str, ptok, log_dir: Path, device, items_prompt: str):
        self.model, self.cfg, self.name, self.ptok = model, cfg, name, ptok
        self.images_dir = Path(log_dir) / "images"
        self.embed_dir = Path(log_dir) / "image_embeddings"
        self.prompt = cfg.preview_prompt or items_prompt
        self.device = device
        self.tiles: list[tuple[int, object]] = []
        self.c_concat = None
        if model.unet.config.in_channels == 9:
            from ..diffusion.conditioning import grey_latent, inpaint_concat
            vae = model.vae
            home = vae.quant_conv.weight.device
            vae.to(device)
            self.c_concat = inpaint_concat(grey_latent(vae, cfg.height, cfg.width, device))
            vae.to(home)

    def __call__(self, step: int, vectors: torch.Tensor, emb) -> Path | None:
        from ..diffusion import samplers as S
        from ..diffusion.sampling import sample_images, to_pil
        from ..infotext import VERSION, make_infotext, write_png_with_infotext
        cfg, m = self.cfg, self.model
        was = m.unet.training
        imgs, _ = sample_images(m, self.ptok, vectors.detach().clone(), self.prompt, cfg.preview_negative,
                                sampler=cfg.preview_sampler, steps=cfg.preview_steps, cfg=cfg.preview_cfg,
                                seeds=[cfg.preview_seed], width=cfg.width, height=cfg.height,
                                clip_skip=cfg.clip_skip, c_concat=self.c_concat, decode_device=self.device)
        m.unet.train(was)
        img = to_pil(imgs)[0]
        # every PNG written here carries the preview's infotext, as A1111's images do
        info = make_infotext(self.prompt, cfg.preview_negative, steps=cfg.preview_steps,
                             sampler=S.SAMPLERS[cfg.preview_sampler].label,
                             schedule_type=S.schedule_label(cfg.preview_sampler, None), cfg_scale=cfg.preview_cfg,
                             seed=cfg.preview_seed, width=cfg.width, height=cfg.height,
                             model_hash=m.info.hash, model_name=m.info.name, clip_skip=cfg.clip_skip,
                             ti_hashes=None, version=VERSION)
        path = None
        if cfg.preview_every and step % cfg.preview_every == 0:
            path = self.images_dir / f"{self.name}-{step}.png"
            write_png_with_infotext(img, path, info)
            self.tiles.append((step, img))
            self.write_grid(info)
        if cfg.png_embed:
            from ..embeddings.png import embedding_to_png, embedding_chunk_text, CHUNK_KEY
            write_png_with_infotext(embedding_to_png(emb, img), self.embed_dir / f"{self.name}-{step}.png", info,
                                    extra_chunks={CHUNK_KEY: embedding_chunk_text(emb)})
        return path

    def write_grid(self, infotext: str) -> Path:
        """images/NAME-grid.png: every preview so far, in step order, labelled with its step."""
        from PIL import Image, ImageDraw
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
        from ..infotext import write_png_with_infotext
        return write_png_with_infotext(grid, self.images_dir / f"{self.name}-grid.png", infotext)
