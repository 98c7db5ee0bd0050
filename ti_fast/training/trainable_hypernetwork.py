"""What a hypernetwork run trains: an A1111 hypernetwork's (k, v) module pairs, hooked into the
frozen UNet's attentions (shared/spec/a1111-compat.md "Hypernetworks"). The same interface as
EmbeddingTrainable (trainable.py), so the loop, the step and the checkpointer are the same:

    parameters()            the modules' fp32 master weights (a CUDA graph keeps their addresses)
    context(te, mb, skip)   the frozen text encoder's output without grad (+ emphasis) [B, 77, 768];
                            the hypernetwork acts inside the UNet, on the k/v inputs of every
                            attention: cross-attention (768) and self-attention (320/640/1280)
    before_micro_batch()    advance the dropout seed in place, once per micro-batch, before its
                            forward (TrainStep calls it, so a captured graph replays it too)
    state_dict()            weights + dropout seed (bitwise resume) and the widths and structure
    write(d, step, out)     OUT/NAME.pt: the A1111 file, step = completed steps, name = NAME,
                            sd_checkpoint / sd_checkpoint_name from the model
    write_periodic(...)     LOG/hypernetworks/NAME-STEP.pt (stored name NAME, as A1111's copies)
    previewing()            eval mode (dropout off) while a preview samples, then train again

In training the strength is 1 and dropout is on; the UNet stays frozen.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import ConfigError, UserError
from ..hypernetworks import Hypernetwork, attach, detach, new_hypernetwork, read_hypernetwork, unet_widths
from ..prompt import emphasize
from .preflight_hypernetwork import structure_dict


class HypernetworkTrainable:
    kind = "hypernetwork"

    def __init__(self, hn: Hypernetwork, name: str, *, model_hash: str | None = None,
                 model_name: str | None = None):
        self.hn, self.name = hn, name
        self.model_hash, self.model_name = model_hash, model_name
        self.unet = None                 # the UNet it is attached to
        self._writer: Hypernetwork | None = None   # CPU copy the files are written from
        # no dropout layer: nothing reads the seed, so the step need not advance it
        self._dropout = hn.structure.use_dropout

    @classmethod
    def for_run(cls, plan, model, device) -> "HypernetworkTrainable":
        """The run's hypernetwork (from --hypernetwork, else created from the create flags with
        A1111's init drawn from the run's seed; weights and dropout seed from the resumable
        state on --resume), attached to the UNet at strength 1 in train mode."""
        hp = plan.hypernetwork
        hn = hp.start if hp.start is not None else new_hypernetwork(plan.name, hp.widths, hp.structure, seed=plan.seed)
        have = unet_widths(model.unet)
        missing = [w for w in hn.widths if w not in have]
        if missing:                      # the header said otherwise: a model file that lies
            raise ConfigError(f"{plan.cfg.model}: the UNet has no attention of width {missing[0]} "
                              f"(its widths: {', '.join(map(str, have))})")
        hn.structure = hp.structure      # the state's weight_init on --resume
        hn.seed_dropout(plan.seed)
        if plan.state is not None:
            hn.restore(plan.state["hypernetwork"])
        out = cls(hn.to(device), plan.name, model_hash=model.info.hash, model_name=model.info.name)
        out.attach(model.unet)
        return out

    def attach(self, unet) -> "HypernetworkTrainable":
        """Hook into `unet` at strength 1, dropout on (train mode); fp32 on the UNet's device."""
        self.hn.train()
        attach(unet, [(self.hn, 1.0)])
        self.unet = unet
        return self

    def close(self) -> None:
        """The plain UNet again (a model shared beyond this run)."""
        if self.unet is not None:
            detach(self.unet)
            self.unet = None

    # ------------------------------------------------------------------ in the model
    def parameters(self) -> list[torch.Tensor]:
        return self.hn.master_parameters()

    @property
    def slots(self) -> dict[str, int]:
        """No trigger word: the prompts are plain text."""
        return {}

    def context(self, text_encoder, mb, clip_skip: int = 1) -> torch.Tensor:
        """The frozen text encoding [B, 77, D] (no grad: nothing before the UNet trains)."""
        with torch.no_grad():
            ctx = text_encoder(mb.input_ids, clip_skip=clip_skip)
            if mb.token_weight is not None:
                ctx = emphasize(ctx, mb.token_weight)
        return ctx

    def before_micro_batch(self) -> None:
        """Fresh dropout masks for the next micro-batch: an in-place add on the seed's device (no
        host sync; inside a captured graph it is replayed)."""
        if self._dropout:
            self.hn.advance_dropout()

    def preview_vectors(self) -> None:
        return None

    @contextmanager
    def previewing(self):
        """Sample previews as the file will be used: eval mode (dropout off), strength 1."""
        was = self.hn.training
        self.hn.eval()
        try:
            yield
        finally:
            self.hn.train(was)

    # ------------------------------------------------------------------ state
    def meta(self) -> dict:
        return {"widths": self.hn.widths, "structure": structure_dict(self.hn.structure)}

    def state_dict(self) -> dict:
        return {"hypernetwork": self.hn.snapshot(), "hypernetwork_meta": self.meta()}

    def load_state_dict(self, d: dict) -> None:
        self.hn.restore(d["hypernetwork"])            # in place: the optimizer and graphs keep them

    def settings(self) -> dict:
        """What settings.json records about what is trained."""
        return {"kind": self.kind, "hypernetwork": {**self.meta(), "parameters": self.hn.num_parameters()}}

    # ------------------------------------------------------------------ files
    def _file(self, d: dict) -> Hypernetwork:
        """A CPU hypernetwork holding the state dict's weights (built once, without init)."""
        if self._writer is None:
            with torch.device("meta"):
                w = Hypernetwork(self.name, self.hn.widths, self.hn.structure, optional_info=self.hn.optional_info)
            self._writer = w.to_empty(device="cpu")
        self._writer.restore(d["hypernetwork"])
        return self._writer

    def output_paths(self, out_dir: Path) -> list[Path]:
        return [Path(out_dir) / f"{self.name}.pt"]

    def result_fields(self, out_dir: Path) -> dict:
        """TrainResult's file fields."""
        return {"hypernetwork": self.output_paths(out_dir)[0]}

    def _save(self, d: dict, step: int, path: Path) -> Path:
        return self._file(d).save(path, step=step, name=self.name, sd_checkpoint=self.model_hash,
                                  sd_checkpoint_name=self.model_name)

    def write(self, d: dict, step: int, out_dir: Path) -> list[Path]:
        """OUT/NAME.pt (A1111) from a state_dict."""
        return [self._save(d, step, self.output_paths(out_dir)[0])]

    def outputs_agree(self, d: dict, step: int, out_dir: Path) -> bool:
        """Does OUT/NAME.pt hold these weights at this step? (Resume rewrites it when not.)"""
        try:
            got = read_hypernetwork(self.output_paths(out_dir)[0])
        except UserError:                # missing, damaged, or not a regular file: rewrite it
            return False
        have = {k: v for k, v in got.state_dict().items() if k != "dropout_seed"}
        want = {k: v for k, v in d["hypernetwork"].items() if k != "dropout_seed"}
        return (got.step == step and have.keys() == want.keys()
                and all(torch.equal(have[k], want[k].detach().float().cpu()) for k in want))

    def periodic_name(self, step: int) -> str:
        return f"{self.name}-{step}"

    def write_periodic(self, d: dict, step: int, log_dir: Path) -> Path:
        """LOG/hypernetworks/NAME-STEP.pt; the stored name stays NAME (A1111's periodic copies)."""
        return self._save(d, step, Path(log_dir) / "hypernetworks" / f"{self.periodic_name(step)}.pt")
