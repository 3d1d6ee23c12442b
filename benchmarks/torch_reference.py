"""PyTorch reference of the Semixup network and its SL / Semixup steps.

Benchmark-only (PyTorch is never a koajax dependency): the same network as
`koajax.models.siamese.SemixupNet` (SAM-HV, instance norm without affine,
LeakyReLU 0.2, dropout 0.35) and the same losses, written the plain PyTorch
way: NCHW, eager mode, Adam. The steps take batches that are already
augmented and normalised, as the published code's data loaders hand them
over; koajax's steps augment on the device inside the timed step, so the
comparison is conservative for koajax.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _block(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Module:
  return nn.Sequential(
      nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
      nn.InstanceNorm2d(cout), nn.LeakyReLU(0.2))


class SemixupNet(nn.Module):
  """Shared branch over both patches, SAM-HV pooling, bias-free head."""

  def __init__(self, width: int = 32, dropout: float = 0.35):
    super().__init__()
    w = width
    self.branch = nn.Sequential(
        _block(1, w), _block(w, w), _block(w, w), nn.Dropout(dropout),
        _block(w, 2 * w, 2), _block(2 * w, 2 * w), nn.Dropout(dropout),
        _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w), nn.Dropout(dropout),
        _block(4 * w, 8 * w, 2), _block(8 * w, 8 * w))
    self.sam = _block(8 * w, 8 * w, kernel=1)
    self.dropout = nn.Dropout(dropout)
    self.head = nn.Linear(16 * w, 5, bias=False)

  def forward(self, pairs: torch.Tensor) -> torch.Tensor:
    b, _, h, w = pairs.shape
    x = self.branch(pairs.reshape(2 * b, 1, h, w))
    x = x.amax(dim=3, keepdim=True)  # SAM-HV: over the width first
    x = self.sam(x).amax(dim=(2, 3))
    return self.head(self.dropout(x.reshape(b, -1)))


def _mix(x, y, lam):
  return lam * x + (1 - lam) * y


def _sq_l2(p, q):
  return ((p - q) ** 2).sum() / p.numel()


def supervised_loss(net, batch):
  return F.cross_entropy(net(batch['labeled']), batch['labels'])


def semixup_loss(net, batch, alpha: float = 0.75):
  """Paper Algorithm 1 with the koajax defaults (probabilities mixed,
  interpolation target held constant): one forward over all four views."""
  beta = torch.distributions.Beta(alpha, alpha)
  lam, lam_l = (max(v, 1 - v) for v in beta.sample((2,)).tolist())
  x_l, y = batch['labeled'], batch['labels']
  t1, t2 = batch['aug1'], batch['aug2']
  perm_l = torch.randperm(len(x_l), device=x_l.device)
  perm = torch.randperm(len(t1), device=t1.device)
  views = [_mix(x_l, x_l[perm_l], lam_l), t1, t2, _mix(t1, t1[perm], lam)]
  logits = net(torch.cat(views)).split([len(v) for v in views])
  logits_l, (p1, p2, p_mix) = logits[0], [l.softmax(-1) for l in logits[1:]]
  supervised = (lam_l * F.cross_entropy(logits_l, y)
                + (1 - lam_l) * F.cross_entropy(logits_l, y[perm_l]))
  target = _mix(p1, p1[perm], lam).detach()
  unlabeled = (2 * _sq_l2(p1, p2) + 2 * (_sq_l2(p_mix, p1) + _sq_l2(p_mix, p2))
               + 4 * _sq_l2(p_mix, target))
  return supervised + unlabeled


LOSSES = {'supervised': supervised_loss, 'semixup': semixup_loss}


def make_batch(method: str, batch_size: int, size: int = 128,
               seed: int = 0, device: str = 'cpu') -> dict[str, torch.Tensor]:
  """Random already-augmented float views for one step of `method`, on
  `device`."""
  g = torch.Generator().manual_seed(seed)
  pairs = lambda n: torch.rand(n, 2, size, size, generator=g) * 2 - 1
  batch = {'labeled': pairs(batch_size),
           'labels': torch.randint(0, 5, (batch_size,), generator=g)}
  if method == 'semixup':  # labeled U unlabeled pool, two augmentations
    batch['aug1'], batch['aug2'] = pairs(2 * batch_size), pairs(2 * batch_size)
  return {k: v.to(device) for k, v in batch.items()}


class Step:
  """One Adam step of `method`: zero_grad, forward, backward, update.

  Returning the loss as a Python float waits for the device, so timing a
  call times the whole step on a GPU too.
  """

  def __init__(self, method: str, width: int = 32, lr: float = 1e-4,
               device: str = 'cpu'):
    torch.manual_seed(0)
    self.net = SemixupNet(width).to(device)
    self.net.train()
    self.opt = torch.optim.Adam(self.net.parameters(), lr)
    self.loss = LOSSES[method]

  def __call__(self, batch, loss=None) -> float:
    """`loss`: the loss function to run (default the method's; the
    benchmark passes its torch.compile'd version)."""
    self.opt.zero_grad(set_to_none=True)
    loss = (loss or self.loss)(self.net, batch)
    loss.backward()
    self.opt.step()
    return float(loss.detach())


def mc_dropout_net(width: int = 32, dropout: float = 0.35) -> SemixupNet:
  """The network in inference mode with its dropout layers sampling.

  Instance norm has no running statistics, so eval mode changes nothing else;
  the Dropout modules are put back in training mode, as MC dropout does in
  PyTorch.
  """
  torch.manual_seed(0)
  net = SemixupNet(width, dropout).eval()
  for module in net.modules():
    if isinstance(module, nn.Dropout):
      module.train()
  return net


def uint8_to_pairs(images) -> torch.Tensor:
  """(N, 2, H, W) uint8 array -> float pairs in [-1, 1], as koajax does."""
  return torch.from_numpy(images).float().div_(255.0).sub_(0.5).div_(0.5)


@torch.no_grad()
def mc_dropout_probs(net: SemixupNet, pairs: torch.Tensor,
                     num_samples: int) -> torch.Tensor:
  """(T, N, C) softmax samples: a Python loop of T stochastic passes."""
  return torch.stack([net(pairs).softmax(-1) for _ in range(num_samples)])
