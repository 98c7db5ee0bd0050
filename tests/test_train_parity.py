"""The training step against a reference built from diffusers' UNet2DConditionModel and
transformers' CLIPTextModel holding the same weights (the diffusers textual_inversion way:
new rows in the token table), fp32 on CPU: loss and gradient of one step, then 20 steps."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from ti_fast.loading import load_model                      # noqa: E402
from ti_fast.prompt import PromptTokenizer                  # noqa: E402
from ti_fast.diffusion.schedule import alphas_cumprod          # noqa: E402
from ti_fast.training.step import MicroBatch, TrainStep        # noqa: E402

PROMPTS = ["a photo of tok", "tok, a painting"]
N = 2


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def pair(tiny_diffusers):
    ours = load_model(tiny_diffusers)
    ref_unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_diffusers / "unet").eval()
    ref_te = transformers.CLIPTextModel.from_pretrained(tiny_diffusers / "text_encoder").eval()
    for m in (ref_unet, ref_te):
        m.requires_grad_(False)
    return ours, ref_unet, ref_te


def setup(ours, seed=0):
    torch.manual_seed(seed)
    ptok = PromptTokenizer(ours.tokenizer, {"tok": N})
    tok = ptok(PROMPTS, chunks=1)
    latents = torch.randn(2, 4, 8, 8)
    init = torch.randn(N, ours.text_encoder.config.width) * 0.02
    return tok, latents, init


class Reference:
    """diffusers-style TI: N new token rows, the whole table in AdamW (others get zero grad)."""

    def __init__(self, unet, te, tok, init):
        self.unet, self.te = unet, te
        emb = te.get_input_embeddings()
        v = emb.weight.shape[0]
        table = torch.cat([emb.weight.detach(), init.clone()])
        self.table = torch.nn.Parameter(table)
        self.v = v
        self.frozen = emb.weight.detach().clone()
        ids = tok.input_ids.clone()
        ids[tok.vector_index >= 0] = v + tok.vector_index[tok.vector_index >= 0]
        self.ids = ids
        acp = alphas_cumprod().float()
        self.sa, self.s1 = acp.sqrt(), (1 - acp).sqrt()

    def loss(self, latents, noise, t):
        # CLIPTextModel with our table: swap in an Embedding over the enlarged table
        emb = torch.nn.Embedding.from_pretrained(self.table, freeze=False)
        emb.weight = self.table
        self.te.set_input_embeddings(emb)
        ctx = self.te(input_ids=self.ids).last_hidden_state
        x_t = self.sa[t].view(-1, 1, 1, 1) * latents + self.s1[t].view(-1, 1, 1, 1) * noise
        eps = self.unet(x_t, t, encoder_hidden_states=ctx).sample
        return ((eps - noise) ** 2).mean()

    @torch.no_grad()
    def restore(self):
        """Rows of ordinary tokens got gradients too: put them back, as the diffusers example does."""
        self.table[: self.v] = self.frozen

    @property
    def vectors(self):
        return self.table[self.v:]


def test_one_step_loss_and_gradient(pair):
    ours, ref_unet, ref_te = pair
    tok, latents, init = setup(ours)
    vec = torch.nn.Parameter(init.clone())
    g = torch.Generator().manual_seed(3)
    step = TrainStep(ours.unet, ours.text_encoder, vec, torch.optim.SGD([vec], lr=0.0), generator=g)
    mb = MicroBatch(latents=latents, input_ids=tok.input_ids, vector_index=tok.vector_index)
    noise, t = step.draw(mb)
    from ti_fast.training.step import ti_loss
    loss = ti_loss(ours.unet, ours.text_encoder, vec, mb, noise, t, step.sqrt_a, step.sqrt_1ma)
    loss.backward()
    ref = Reference(ref_unet, ref_te, tok, init)
    rloss = ref.loss(latents, noise, t)
    rloss.backward()
    assert rel(loss.detach(), rloss.detach()) <= 1e-4
    rgrad = ref.table.grad[ref.v:]
    assert rgrad.abs().max() > 0
    assert rel(vec.grad, rgrad) <= 1e-4, (vec.grad, rgrad)


def test_twenty_step_trajectory(pair):
    ours, ref_unet, ref_te = pair
    tok, latents, init = setup(ours, seed=1)
    vec = torch.nn.Parameter(init.clone())
    g = torch.Generator().manual_seed(5)
    opt = torch.optim.AdamW([vec], lr=1e-3, weight_decay=0.0)
    step = TrainStep(ours.unet, ours.text_encoder, vec, opt, generator=g)
    mb = MicroBatch(latents=latents, input_ids=tok.input_ids, vector_index=tok.vector_index)
    ref = Reference(ref_unet, ref_te, tok, init)
    ropt = torch.optim.AdamW([ref.table], lr=1e-3, weight_decay=0.0)
    rg = torch.Generator().manual_seed(5)
    ours_loss, ref_loss = [], []
    for _ in range(20):
        loss, finite = step([mb])
        ours_loss.append(loss.item())
        assert bool(finite)
        noise = torch.randn(latents.shape, generator=rg)           # same draws, same order
        t = torch.randint(0, 1000, (latents.shape[0],), generator=rg)
        ropt.zero_grad()
        rl = ref.loss(latents, noise, t)
        rl.backward()
        ropt.step()
        ref.restore()
        ref_loss.append(rl.item())
    assert max(abs(a - b) / abs(b) for a, b in zip(ours_loss, ref_loss)) <= 1e-4
    assert rel(vec.detach() - init, ref.vectors.detach() - init) <= 1e-4  # the updates themselves
    assert rel(vec.detach(), ref.vectors.detach()) <= 1e-4
    assert not torch.equal(vec.detach(), init)
