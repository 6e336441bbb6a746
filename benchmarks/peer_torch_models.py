"""The PyTorch peer of the tokenizer step, the Gumbel quantizer and the AR prior.

Written for `benchmarks.peer_torch` from the published architecture of
taming-transformers (Esser et al.: `taming/modules/diffusionmodules/model.py`'s Encoder
and Decoder, `taming/modules/discriminator/model.py`'s NLayerDiscriminator,
`taming/modules/vqvae/quantize.py`'s GumbelQuantize, `taming/modules/losses/lpips.py`,
`taming/modules/transformer/mingpt.py`), at the sizes rvq_jax's configs give. Our own
code, not a copy. It imports torch at the top: `benchmarks.peer_torch` imports this module
only when torch is installed (torch is an optional benchmark dependency).

Layout NCHW (PyTorch's default, as taming). Where rvq_jax departs from taming, the peer
follows rvq_jax so that both columns do the same work:

* the PatchGAN's norm is GroupNorm(32, eps 1e-5) (rvq_jax's default `disc_norm='group'`),
  not taming's BatchNorm2d;
* the quantizer is Reg-VQ (projection logits; hard straight-through Gumbel samples at
  round(r·L) positions per image, argmax elsewhere; prior KL(p̄ ‖ uniform)), the same
  math as `rvq_jax.models.tokenizer.quantizers.regularized`, written the plain way
  (an [N, K] one-hot times the codebook, as taming's GumbelQuantize);
* the step computes taming's adaptive GAN weight from the gradients of the NLL and of
  the GAN loss at the decoder's last kernel, obtained as rvq_jax does: both losses'
  gradients at the reconstructions (one backward through VGG16, one through D), pulled
  back through the last convolution only; then ONE backward through the generator.
  (Taming calls autograd.grad twice through the whole loss and then backward again.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORM_GROUPS = 32
NORM_EPS = 1e-6           # taming's Normalize()
DISC_NORM_EPS = 1e-5      # PyTorch's GroupNorm/BatchNorm default (rvq_jax's discriminator)
LEAKY_SLOPE = 0.2
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
VGG16_BLOCK_CONVS = (2, 2, 3, 3, 3)
VGG_CHANNELS = (64, 128, 256, 512, 512)


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
  return sum(p.numel() for p in module.parameters()
             if p.requires_grad or not trainable_only)


def swish(x: torch.Tensor) -> torch.Tensor:
  return x * torch.sigmoid(x)


def normalize(channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.norm1 = normalize(in_channels)
    self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    self.norm2 = normalize(out_channels)
    self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
    self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                         if in_channels != out_channels else None)

  def forward(self, x):
    h = self.conv1(swish(self.norm1(x)))
    h = self.conv2(swish(self.norm2(h)))
    skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
    return skip + h


class AttnBlock(nn.Module):
  """Single-head attention over the H·W positions (taming's 1×1-conv q, k, v)."""

  def __init__(self, channels: int):
    super().__init__()
    self.norm = normalize(channels)
    self.q = nn.Conv2d(channels, channels, 1)
    self.k = nn.Conv2d(channels, channels, 1)
    self.v = nn.Conv2d(channels, channels, 1)
    self.proj_out = nn.Conv2d(channels, channels, 1)

  def forward(self, x):
    b, c, h, w = x.shape
    y = self.norm(x)
    q = self.q(y).reshape(b, c, h * w).transpose(1, 2)      # b, hw, c
    k = self.k(y).reshape(b, c, h * w)                      # b, c, hw
    v = self.v(y).reshape(b, c, h * w)                      # b, c, hw
    weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)   # b, hw(q), hw(k)
    out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
    return x + self.proj_out(out)


class Downsample(nn.Module):
  """Zero-pad right/bottom by one, conv3×3 stride 2 (taming's asymmetric padding)."""

  def __init__(self, channels: int):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
  def __init__(self, channels: int):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
  def __init__(self, blocks, attns, resample):
    super().__init__()
    self.block = nn.ModuleList(blocks)
    self.attn = nn.ModuleList(attns)
    self.resample = resample

  def forward(self, x):
    for i, block in enumerate(self.block):
      x = block(x)
      if len(self.attn):
        x = self.attn[i](x)
    return x if self.resample is None else self.resample(x)


class Mid(nn.Module):
  def __init__(self, channels: int):
    super().__init__()
    self.block_1 = ResnetBlock(channels, channels)
    self.attn_1 = AttnBlock(channels)
    self.block_2 = ResnetBlock(channels, channels)

  def forward(self, x):
    return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
  def __init__(self, *, in_channels=3, ch, ch_mult, num_res_blocks, attn_resolutions,
               resolution, z_channels):
    super().__init__()
    self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
    levels, channels, res = [], ch, resolution
    for i, mult in enumerate(ch_mult):
      blocks, attns = [], []
      for _ in range(num_res_blocks):
        blocks.append(ResnetBlock(channels, ch * mult))
        channels = ch * mult
        if res in attn_resolutions:
          attns.append(AttnBlock(channels))
      down = None
      if i != len(ch_mult) - 1:
        down, res = Downsample(channels), res // 2
      levels.append(Level(blocks, attns, down))
    self.down = nn.ModuleList(levels)
    self.mid = Mid(channels)
    self.norm_out = normalize(channels)
    self.conv_out = nn.Conv2d(channels, z_channels, 3, padding=1)

  def forward(self, x):
    h = self.conv_in(x)
    for level in self.down:
      h = level(h)
    return self.conv_out(swish(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
  def __init__(self, *, out_channels=3, ch, ch_mult, num_res_blocks, attn_resolutions,
               resolution, z_channels):
    super().__init__()
    channels = ch * ch_mult[-1]
    res = resolution // 2 ** (len(ch_mult) - 1)
    self.conv_in = nn.Conv2d(z_channels, channels, 3, padding=1)
    self.mid = Mid(channels)
    deepest_first = []
    for i in reversed(range(len(ch_mult))):
      blocks, attns = [], []
      for _ in range(num_res_blocks + 1):
        blocks.append(ResnetBlock(channels, ch * ch_mult[i]))
        channels = ch * ch_mult[i]
        if res in attn_resolutions:
          attns.append(AttnBlock(channels))
      up = None
      if i != 0:
        up, res = Upsample(channels), res * 2
      deepest_first.append(Level(blocks, attns, up))
    self.up = nn.ModuleList(deepest_first[::-1])   # up[0] runs last, as taming
    self.norm_out = normalize(channels)
    self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

  def last_layer_input(self, z):
    h = self.mid(self.conv_in(z))
    for level in reversed(self.up):
      h = level(h)
    return swish(self.norm_out(h))

  def forward(self, z):
    return self.conv_out(self.last_layer_input(z))


class RegVQ(nn.Module):
  """Reg-VQ with projection logits, τ constant (rvq_jax's default configuration).

  forward(z [B, C, h, w]) → (z_q [B, D, h, w], weighted loss, deterministic region
  [B, h, w] bool, indices [B, h, w], stats).
  """

  def __init__(self, in_features: int, num_codes: int, code_dim: int, *, mask_ratio: float,
               prior_kl_weight: float, tau: float = 1.0):
    super().__init__()
    self.num_codes, self.code_dim = num_codes, code_dim
    self.mask_ratio, self.prior_kl_weight, self.tau = mask_ratio, prior_kl_weight, tau
    self.codebook = nn.Parameter(torch.randn(num_codes, code_dim))
    self.proj = nn.Linear(in_features, num_codes)

  def forward(self, z):
    b, c, h, w = z.shape
    length, k = h * w, self.num_codes
    logits = self.proj(z.permute(0, 2, 3, 1).reshape(b, length, c))      # [B, L, K]
    soft = torch.softmax(logits / self.tau, dim=-1)
    argmax = logits.argmax(dim=-1)
    sampled = int(self.mask_ratio * length + 0.5)
    indices, soft_used = argmax, soft
    if sampled:
      positions = torch.rand(b, length).argsort(dim=1)[:, :sampled]        # [B, S]
      rows = positions[..., None].expand(-1, -1, k)
      gumbel = -torch.empty(b, sampled, k).exponential_().log()
      noisy = logits.gather(1, rows) + gumbel
      indices = argmax.scatter(1, positions, noisy.argmax(dim=-1))
      soft_used = soft.scatter(1, rows, torch.softmax(noisy / self.tau, dim=-1))
    hard = F.one_hot(indices, k).to(soft.dtype)
    one_hot = hard - soft_used.detach() + soft_used                      # straight-through
    quantized = (one_hot @ self.codebook).reshape(b, h, w, self.code_dim)
    mean_probs = soft.mean(dim=(0, 1))
    prior_kl = torch.sum(torch.special.xlogy(mean_probs, mean_probs)) + math.log(k)
    counts = torch.bincount(indices.reshape(-1), minlength=k).to(soft.dtype)
    probs = counts / counts.sum()
    stats = {"usage": (counts > 0).to(soft.dtype).mean(),
             "perplexity": torch.exp(-torch.sum(torch.special.xlogy(probs, probs)))}
    region = (indices == argmax).reshape(b, h, w)
    return (quantized.permute(0, 3, 1, 2), self.prior_kl_weight * prior_kl, region,
            indices.reshape(b, h, w), stats)


class Tokenizer(nn.Module):
  def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, resolution,
               z_channels, num_codes, code_dim, mask_ratio, prior_kl_weight):
    super().__init__()
    arch = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                attn_resolutions=tuple(attn_resolutions), resolution=resolution,
                z_channels=z_channels)
    self.encoder = Encoder(**arch)
    # Categorical quantizers take the encoder width (rvq_jax's `input_width`).
    self.quant_conv = nn.Conv2d(z_channels, z_channels, 1)
    self.quantizer = RegVQ(z_channels, num_codes, code_dim, mask_ratio=mask_ratio,
                           prior_kl_weight=prior_kl_weight)
    self.post_quant_conv = nn.Conv2d(code_dim, z_channels, 1)
    self.decoder = Decoder(**arch)


class NLayerDiscriminator(nn.Module):
  """PatchGAN: conv4×4 s2 → LReLU, n × (conv4×4 → GroupNorm → LReLU), conv4×4 → 1."""

  def __init__(self, *, in_channels=3, ndf=64, n_layers=3):
    super().__init__()
    widths = [ndf * min(2**n, 8) for n in range(n_layers + 1)]
    layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
              nn.LeakyReLU(LEAKY_SLOPE)]
    for n in range(1, n_layers + 1):
      layers += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=2 if n < n_layers else 1,
                           padding=1, bias=False),
                 nn.GroupNorm(NORM_GROUPS, widths[n], eps=DISC_NORM_EPS),
                 nn.LeakyReLU(LEAKY_SLOPE)]
    layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
    self.main = nn.Sequential(*layers)

  def forward(self, x):
    return self.main(x)


class LPIPS(nn.Module):
  """LPIPS 'vgg' v0.1: scaling layer, VGG16 to relu5_3, unit-normalized features,
  squared differences, 1×1 heads (no bias), spatial means summed. Frozen."""

  def __init__(self):
    super().__init__()
    self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).reshape(1, 3, 1, 1))
    self.register_buffer("scale", torch.tensor(LPIPS_SCALE).reshape(1, 3, 1, 1))
    blocks, channels = [], 3
    for convs, width in zip(VGG16_BLOCK_CONVS, VGG_CHANNELS):
      layers = []
      for _ in range(convs):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        channels = width
      blocks.append(nn.Sequential(*layers))
    self.blocks = nn.ModuleList(blocks)
    self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in VGG_CHANNELS])
    with torch.no_grad():
      for lin, c in zip(self.lins, VGG_CHANNELS):
        lin.weight.uniform_(0.0, 2.0 / c)
    self.requires_grad_(False)

  def features(self, x):
    h, out = (x - self.shift) / self.scale, []
    for i, block in enumerate(self.blocks):
      if i:
        h = F.max_pool2d(h, 2)
      h = block(h)
      out.append(h)
    return out

  @staticmethod
  def unit(f, eps=1e-10):
    squared = torch.sum(f * f, dim=1, keepdim=True)
    positive = squared > 0
    norm = torch.where(positive, torch.sqrt(torch.where(positive, squared, 1.0)), 0.0)
    return f / (norm + eps)

  def forward(self, real, fake):
    """[B] distances; the real images' features carry no gradient (taming's inputs)."""
    with torch.no_grad():
      real_features = self.features(real)
    total = 0.0
    for lin, fr, ff in zip(self.lins, real_features, self.features(fake)):
      total = total + lin((self.unit(fr) - self.unit(ff)) ** 2).mean(dim=(2, 3))
    return total[:, 0]


def masked_l1(images, reconstructions, region):
  """Mean |x − x̂| over the pixels of the [B, h, w] token region (rvq_jax's masked_l1)."""
  f = images.shape[2] // region.shape[1]
  pixels = region.repeat_interleave(f, dim=1).repeat_interleave(f, dim=2)
  pixels = pixels.to(images.dtype)[:, None]
  total = torch.sum(torch.abs(images - reconstructions) * pixels)
  return total / torch.clamp(pixels.sum() * images.shape[1], min=1.0)


class TokenizerStep:
  """One full training step: generator (L1 + LPIPS + quantizer + adaptive-weight GAN
  term, one generator backward), then the discriminator (hinge), each with global-norm
  clipping at `grad_clip` and Adam(b1, b2), as rvq_jax's tokenizer stage."""

  def __init__(self, tokenizer: Tokenizer, discriminator: NLayerDiscriminator,
               lpips: LPIPS | None, *, perceptual_weight: float, l1_weight: float,
               disc_weight: float, disc_factor: float, learning_rate: float,
               disc_learning_rate: float, b1: float, b2: float, grad_clip: float):
    self.g, self.d, self.lpips = tokenizer, discriminator, lpips
    self.perceptual_weight, self.l1_weight = perceptual_weight, l1_weight
    self.disc_weight, self.disc_factor, self.grad_clip = disc_weight, disc_factor, grad_clip
    self.g_opt = torch.optim.Adam(tokenizer.parameters(), lr=learning_rate, betas=(b1, b2))
    self.d_opt = torch.optim.Adam(discriminator.parameters(), lr=disc_learning_rate,
                                  betas=(b1, b2))

  def __call__(self, images: torch.Tensor) -> dict:
    g, d = self.g, self.d
    quantized, code_loss, region, _, stats = g.quantizer(g.quant_conv(g.encoder(images)))
    last_input = g.decoder.last_layer_input(g.post_quant_conv(quantized))
    reconstructions = g.decoder.conv_out(last_input)
    rec = reconstructions.detach().requires_grad_(True)
    l1 = masked_l1(images, rec, region)
    nll = self.l1_weight * l1
    lpips = None
    if self.perceptual_weight > 0:
      lpips = self.lpips(images, rec).mean()
      nll = nll + self.perceptual_weight * lpips
    (nll_cotangent,) = torch.autograd.grad(nll, rec)
    gan = -torch.mean(d(rec))
    (gan_cotangent,) = torch.autograd.grad(gan, rec)
    # The two losses' gradients at the last kernel: the cotangents through conv_out only.
    kernel = g.decoder.conv_out.weight
    layer_input = last_input.detach()

    def kernel_grad(cotangent):
      return torch.nn.grad.conv2d_weight(layer_input, kernel.shape, cotangent, padding=1)

    with torch.no_grad():
      ratio = (torch.linalg.vector_norm(kernel_grad(nll_cotangent))
               / (torch.linalg.vector_norm(kernel_grad(gan_cotangent)) + 1e-4))
      gan_weight = torch.clamp(ratio, 0.0, 1e4) * self.disc_weight * self.disc_factor
    self.g_opt.zero_grad(set_to_none=True)
    torch.autograd.backward([reconstructions, code_loss],
                            [nll_cotangent + gan_weight * gan_cotangent, torch.ones(())])
    g_norm = torch.nn.utils.clip_grad_norm_(g.parameters(), self.grad_clip)
    self.g_opt.step()

    fake = reconstructions.detach()
    logits_real, logits_fake = d(images), d(fake)
    d_loss = self.disc_factor * 0.5 * (torch.mean(F.relu(1.0 - logits_real))
                                       + torch.mean(F.relu(1.0 + logits_fake)))
    self.d_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    d_norm = torch.nn.utils.clip_grad_norm_(d.parameters(), self.grad_clip)
    self.d_opt.step()
    loss = nll.detach() + code_loss.detach() + gan_weight * gan.detach()
    return {"loss": loss, "l1": l1.detach(), "lpips": lpips, "gan_weight": gan_weight,
            "d_loss": d_loss.detach(), "grad_norm": g_norm, "d_grad_norm": d_norm, **stats}


# ---------------------------------------------------------------------- Gumbel-VQ


class GumbelQuantize(nn.Module):
  """taming's GumbelQuantize semantics (training mode, straight_through=True): logits by a
  1×1 conv, hard Gumbel-softmax one-hot (straight-through), z_q = one-hot · codebook,
  loss kl_weight · mean_i Σ_k q_ik log(q_ik K + 1e-10) with q = softmax(logits).

  `forward(z, tau, gumbel=None)`: z [B, C, h, w]; `gumbel` [B, K, h, w] noise to use
  (None: drawn, as F.gumbel_softmax draws it). Returns (z_q [B, D, h, w], loss, indices).
  """

  def __init__(self, num_hiddens: int, embedding_dim: int, n_embed: int,
               kl_weight: float = 5e-4):
    super().__init__()
    self.n_embed, self.kl_weight = n_embed, kl_weight
    self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
    self.embed = nn.Embedding(n_embed, embedding_dim)

  def forward(self, z, tau: float, gumbel=None):
    logits = self.proj(z)
    if gumbel is None:
      gumbel = -torch.empty_like(logits).exponential_().log()
    soft = torch.softmax((logits + gumbel) / tau, dim=1)
    indices = soft.argmax(dim=1)
    hard = torch.zeros_like(logits).scatter_(1, indices[:, None], 1.0)
    one_hot = hard - soft.detach() + soft
    z_q = torch.einsum("bnhw,nd->bdhw", one_hot, self.embed.weight)
    qy = torch.softmax(logits, dim=1)
    loss = self.kl_weight * torch.sum(qy * torch.log(qy * self.n_embed + 1e-10), dim=1).mean()
    return z_q, loss, indices


# ---------------------------------------------------------------------- GPT with a KV cache


class CausalSelfAttention(nn.Module):
  def __init__(self, width: int, heads: int):
    super().__init__()
    self.heads, self.head_dim = heads, width // heads
    self.query = nn.Linear(width, width)
    self.key = nn.Linear(width, width)
    self.value = nn.Linear(width, width)
    self.out = nn.Linear(width, width)

  def forward(self, x, cache, start: int):
    """x [B, T, W] at positions [start, start + T); cache (k, v) [B, H, max_len, hd]."""
    b, t, w = x.shape

    def split(y):
      return y.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)

    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    cache_k, cache_v = cache
    cache_k[:, :, start:start + t] = k
    cache_v[:, :, start:start + t] = v
    k, v = cache_k[:, :, :start + t], cache_v[:, :, :start + t]
    logits = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5          # [B, H, T, S]
    if t > 1:
      query_pos = torch.arange(start, start + t)[:, None]
      key_pos = torch.arange(start + t)[None, :]
      logits = logits.masked_fill(key_pos > query_pos, float("-inf"))
    y = torch.softmax(logits, dim=-1) @ v
    return self.out(y.transpose(1, 2).reshape(b, t, w))


class Block(nn.Module):
  def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
    super().__init__()
    self.ln_1 = nn.LayerNorm(width)
    self.attn = CausalSelfAttention(width, heads)
    self.ln_2 = nn.LayerNorm(width)
    self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                             nn.Linear(mlp_ratio * width, width))

  def forward(self, x, cache, start):
    x = x + self.attn(self.ln_1(x), cache, start)
    return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
  """minGPT (pre-LN blocks, final LayerNorm, linear head) over an SOS token and the L − 1
  previous tokens: rvq_jax's unconditional ARPrior at the same sizes."""

  def __init__(self, *, vocab_size: int, length: int, width: int, depth: int, heads: int,
               mlp_ratio: int = 4):
    super().__init__()
    self.vocab_size, self.length, self.heads = vocab_size, length, heads
    self.sos = nn.Parameter(0.02 * torch.randn(1, width))
    self.tok_embed = nn.Embedding(vocab_size, width)
    self.pos_embed = nn.Parameter(0.02 * torch.randn(length, width))   # SOS + L − 1
    self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(depth)])
    self.ln_f = nn.LayerNorm(width)
    self.head = nn.Linear(width, vocab_size)

  @torch.inference_mode()
  def sample(self, num_samples: int, temperature: float = 1.0) -> torch.Tensor:
    """[num_samples, L] tokens, one position per step through the KV cache."""
    n, width = num_samples, self.sos.shape[1]
    head_dim = width // self.heads
    caches = [(torch.zeros(n, self.heads, self.length, head_dim),
               torch.zeros(n, self.heads, self.length, head_dim)) for _ in self.blocks]
    tokens = torch.zeros(n, self.length, dtype=torch.long)
    x = (self.sos + self.pos_embed[:1]).expand(n, 1, width)
    for i in range(self.length):
      for block, cache in zip(self.blocks, caches):
        x = block(x, cache, i)
      logits = self.head(self.ln_f(x[:, -1])) / temperature
      ids = torch.multinomial(torch.softmax(logits, dim=-1), 1)[:, 0]
      tokens[:, i] = ids
      if i + 1 < self.length:
        x = (self.tok_embed(ids) + self.pos_embed[i + 1])[:, None]
    return tokens
