"""digits-gpt: a LlamaGen-style class-conditional GPT over digits-vq tokens.

Architecture (LlamaGen c2i, scaled down): pre-norm decoder with RMSNorm, SwiGLU
feed-forward w2(silu(w1 x) ⊙ w3 x), fused ``wqkv`` projection, 2-D rotary embeddings
over the token grid, and a class-token prefix. Module and state-dict names follow
LlamaGen's ``Transformer``: ``cls_embedding.embedding_table``, ``tok_embeddings``,
``layers.N.attention.{wqkv,wo}``, ``layers.N.feed_forward.{w1,w2,w3}``,
``layers.N.{attention_norm,ffn_norm}``, ``norm``, ``output``.

Class c = digit·5 + colour (50 classes); row ``num_classes`` of the class table is the
null class, substituted with probability ``class_dropout_prob`` in training, so that
sampling can use classifier-free guidance on the logits:
ℓ = ℓ_uncond + s·(ℓ_cond − ℓ_uncond).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlprox.zoo.pretrained import ZooModule


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, dim: int, multiple_of: int, ffn_dim_multiplier: float | None):
        super().__init__()
        hidden = int(2 * (4 * dim) / 3)
        if ffn_dim_multiplier is not None:
            hidden = int(ffn_dim_multiplier * hidden)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def precompute_freqs_cis_2d(grid_size: int, head_dim: int, base: float, cls_token_num: int):
    """(cls_token_num + grid², head_dim/2, 2) table of (cos, sin) for 2-D RoPE.

    Half of each head's rotation pairs encode the row, half the column, with
    frequencies θ_j = base^(−2j / (head_dim/2)). As in LlamaGen, class-token positions
    get an all-zero table, i.e. their q and k are zeroed (they still pass values).
    """
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2)[: half // 2].float() / half)  # (head_dim/4,)
    t = torch.arange(grid_size, dtype=torch.float32)
    angles = torch.outer(t, freqs)  # (G, head_dim/4)
    grid = torch.cat(
        [angles[:, None, :].expand(-1, grid_size, -1), angles[None, :, :].expand(grid_size, -1, -1)],
        dim=-1,
    )  # (G, G, head_dim/2): row angles then column angles
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)  # (G², head_dim/2, 2)
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])


def apply_rotary_emb(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x (B,T,H,D), freqs (T,D/2,2): rotate each consecutive pair (x₀,x₁) by its angle."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs[None, :, None]  # (1,T,1,D/2,2)
    out = torch.stack(
        [xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
         xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # not in state dict

    def forward(self, x, freqs, input_pos=None):
        b, t, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = apply_rotary_emb(q.view(b, t, self.n_head, self.head_dim), freqs).transpose(1, 2)
        k = apply_rotary_emb(k.view(b, t, self.n_kv_head, self.head_dim), freqs).transpose(1, 2)
        v = v.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B,Hkv,T,D)
        if input_pos is None:
            mask, causal = None, True
        else:  # write this step's keys/values into the cache, attend to positions ≤ input_pos
            k_cache, v_cache = self.kv_cache
            k_cache[:b, :, input_pos] = k
            v_cache[:b, :, input_pos] = v
            k, v = k_cache[:b], v_cache[:b]
            mask = torch.arange(k.shape[2])[None, :] <= input_pos[:, None]  # (T, Tmax)
            causal = False
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class TransformerBlock(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, multiple_of, ffn_dim_multiplier, norm_eps):
        super().__init__()
        self.attention = Attention(dim, n_head, n_kv_head)
        self.feed_forward = FeedForward(dim, multiple_of, ffn_dim_multiplier)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)

    def forward(self, x, freqs, input_pos=None):
        h = x + self.attention(self.attention_norm(x), freqs, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class id -> (B,1,dim); row ``num_classes`` is the null class used for CFG."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor, train: bool, generator=None) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, generator=generator) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)


class Transformer(ZooModule):
    """Class-conditional GPT. ``block_size`` = number of image tokens (grid²)."""

    def __init__(
        self,
        dim: int = 96,
        n_layer: int = 3,
        n_head: int = 4,
        n_kv_head: int | None = None,
        multiple_of: int = 32,
        ffn_dim_multiplier: float | None = None,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        num_classes: int = 50,
        class_dropout_prob: float = 0.1,
        vocab_size: int = 128,
        cls_token_num: int = 1,
        block_size: int = 16,
    ):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        self.config = dict(
            dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
            multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier,
            rope_base=rope_base, norm_eps=norm_eps, initializer_range=initializer_range,
            num_classes=num_classes, class_dropout_prob=class_dropout_prob,
            vocab_size=vocab_size, cls_token_num=cls_token_num, block_size=block_size,
        )
        head_dim = dim // n_head
        if dim % n_head or head_dim % 4:
            raise ValueError(f"dim/n_head must be an integer divisible by 4 (got {dim}/{n_head})")
        grid = int(round(block_size**0.5))
        if grid * grid != block_size:
            raise ValueError(f"block_size must be a square grid (got {block_size})")
        self.num_classes, self.cls_token_num, self.block_size = num_classes, cls_token_num, block_size
        self.cls_embedding = LabelEmbedder(num_classes, dim, class_dropout_prob)
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, n_head, n_kv_head, multiple_of, ffn_dim_multiplier, norm_eps)
            for _ in range(n_layer)
        )
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.register_buffer(
            "freqs_cis",
            precompute_freqs_cis_2d(grid, head_dim, rope_base, cls_token_num),
            persistent=False,
        )
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=initializer_range)
        nn.init.zeros_(self.output.weight)

    def setup_caches(self, max_batch_size: int) -> None:
        """Allocate per-layer KV caches for cls_token_num + block_size positions."""
        seq = self.cls_token_num + self.block_size
        for layer in self.layers:
            att = layer.attention
            shape = (max_batch_size, att.n_kv_head, seq, att.head_dim)
            att.kv_cache = (torch.zeros(shape), torch.zeros(shape))

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def forward(self, idx, cond_idx, input_pos=None, targets=None, generator=None):
        """Three modes, as in LlamaGen:

        - full sequence (``input_pos`` None): idx (B,T) tokens 0..T-1, cond_idx (B,) ->
          logits (B,T+1,V) predicting tokens 0..T; with ``targets`` (B,T+1) also the
          cross-entropy loss;
        - cached prefill: idx None, cond_idx (B,), input_pos = arange(cls_token_num);
        - cached decode: idx (B,1), cond_idx None, input_pos = (position,).
        """
        if input_pos is None:
            h = self.cls_embedding(cond_idx, train=self.training, generator=generator)
            h = torch.cat([h[:, : self.cls_token_num], self.tok_embeddings(idx)], dim=1)
            freqs = self.freqs_cis[: h.shape[1]]
        elif idx is None:
            h = self.cls_embedding(cond_idx, train=False)[:, : self.cls_token_num]
            freqs = self.freqs_cis[input_pos]
        else:
            h = self.tok_embeddings(idx)
            freqs = self.freqs_cis[input_pos]
        for layer in self.layers:
            h = layer(h, freqs, input_pos)
        logits = self.output(self.norm(h)).float()
        if input_pos is None:
            logits = logits[:, self.cls_token_num - 1 :]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits (B,V) -> token ids (B,): temperature, then top-k / nucleus filtering."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) > top_p  # keep the token crossing top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: Transformer,
    cond_idx: torch.Tensor,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Sample (B, block_size) token ids for classes cond_idx (B,).

    With cfg_scale ≠ 1 the batch is doubled with the null class and the logits combined
    as ℓ_u + s·(ℓ_c − ℓ_u). ``use_cache=False`` recomputes the full prefix each step
    (the reference the KV-cache path is tested against).
    """
    model.eval()
    b = cond_idx.shape[0]
    cfg = cfg_scale != 1.0
    if cfg and model.cls_embedding.embedding_table.num_embeddings <= model.num_classes:
        raise ValueError("cfg_scale != 1 needs a null class (train with class_dropout_prob > 0)")
    cond = torch.cat([cond_idx, torch.full_like(cond_idx, model.num_classes)]) if cfg else cond_idx
    tokens = torch.zeros(b, 0, dtype=torch.long)

    def next_token(logits):  # logits (B or 2B, V)
        if cfg:
            c, u = logits.split(b)
            logits = u + cfg_scale * (c - u)
        return sample_logits(logits, temperature, top_k, top_p, generator)

    if use_cache:
        model.setup_caches(cond.shape[0])
        try:
            n_cls = model.cls_token_num
            logits, _ = model(None, cond, input_pos=torch.arange(n_cls))
            tok = next_token(logits[:, -1])
            tokens = tok[:, None]
            for i in range(1, model.block_size):
                step_in = torch.cat([tok, tok])[:, None] if cfg else tok[:, None]
                logits, _ = model(step_in, None, input_pos=torch.tensor([n_cls + i - 1]))
                tok = next_token(logits[:, -1])
                tokens = torch.cat([tokens, tok[:, None]], dim=1)
        finally:
            model.clear_caches()
    else:
        for _ in range(model.block_size):
            seq = torch.cat([tokens, tokens]) if cfg else tokens
            logits, _ = model(seq, cond)
            tok = next_token(logits[:, -1])
            tokens = torch.cat([tokens, tok[:, None]], dim=1)
    return tokens


def train_gpt(tokens, classes, steps: int, batch_size: int = 128, lr: float = 1e-3,
              seed: int = 0, progress: bool = True, **config) -> Transformer:
    """Next-token cross-entropy on (class, tokens) pairs; AdamW (wd 0.01) one-cycle."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(block_size=tokens.shape[1], **config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    bar = tqdm(range(steps), desc="digits-gpt", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(0, len(tokens), (batch_size,), generator=gen)
        seq = tokens[idx]
        _, loss = model(seq[:, :-1], classes[idx], targets=seq, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()
