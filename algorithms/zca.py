"""ZCA whitening of images, as MTT preprocesses CIFAR (``--zca``).

MTT fits kornia's ``ZCAWhitening(eps=0.1)`` on the whole training split (pixels in [0, 1], no
mean/std normalisation before it) and whitens the training and test images with it; the
distilled images then live in the whitened space, and the inverse maps them back to pixels for
viewing. The transform of flattened images ``x`` (D = C*H*W values each) is

    z = (x - mu) W,   W = U diag(1 / sqrt(lambda + eps)) U^T,

with ``mu`` the training mean, ``U diag(lambda) U^T`` the unbiased (N - 1) covariance of the
training images and ``eps`` the regularisation (0.1): the whitened training set has covariance
``U diag(lambda / (lambda + eps)) U^T``, the identity on directions of variance well above
``eps`` and shrunk on the others. The inverse is ``x = z W^-1 + mu`` with
``W^-1 = U diag(sqrt(lambda + eps)) U^T``.

The fit runs in float64, in chunks of the training set (its covariance is D x D: 3072 x 3072
for CIFAR). :meth:`ZCA.state_dict` gives plain float64 tensors (``mean`` shaped like one image,
``transform``, ``inverse``, ``eps``), which safetensors can store; :meth:`ZCA.from_state_dict`
rebuilds the same transform.
"""
from __future__ import annotations

import torch

DEFAULT_EPS = 0.1  # MTT's ZCAWhitening(eps=0.1)


class ZCA:
    """A fitted ZCA whitening: ``transform`` (pixels -> whitened) and ``inverse``."""

    def __init__(self, mean: torch.Tensor, transform: torch.Tensor, inverse: torch.Tensor, eps: float):
        d = mean.numel()
        if transform.shape != (d, d) or inverse.shape != (d, d):
            raise ValueError(f"ZCA: the mean has {d} values, so transform and inverse must be {d}x{d}; got "
                             f"{tuple(transform.shape)} and {tuple(inverse.shape)}")
        self.mean = mean.detach().to("cpu", torch.float64).contiguous()
        self.matrix = transform.detach().to("cpu", torch.float64).contiguous()
        self.inverse_matrix = inverse.detach().to("cpu", torch.float64).contiguous()
        self.eps = float(eps)
        self._cast: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one image, (C, H, W)."""
        return tuple(self.mean.shape)

    @classmethod
    def fit(cls, x: torch.Tensor, eps: float = DEFAULT_EPS, chunk: int = 4096) -> "ZCA":
        """Fit on the training images ``x`` [N, C, H, W] (N >= 2): mean and unbiased covariance in
        float64 (``chunk`` images at a time, on x's device), eigendecomposition, eigenvalues +
        ``eps``. The fitted tensors are kept on the CPU."""
        if x.dim() < 2 or x.shape[0] < 2:
            raise ValueError(f"ZCA.fit needs at least 2 images [N, C, H, W], got shape {tuple(x.shape)}")
        if not eps >= 0:
            raise ValueError(f"ZCA.fit: eps must be >= 0, got {eps}")
        n, shape = x.shape[0], tuple(x.shape[1:])
        flat = x.detach().reshape(n, -1)
        d, dev = flat.shape[1], flat.device  # computed where x lies (a GPU is much faster for CIFAR)
        total = torch.zeros(d, dtype=torch.float64, device=dev)
        for i in range(0, n, chunk):
            total += flat[i : i + chunk].to(torch.float64).sum(0)
        mean = total / n
        cov = torch.zeros(d, d, dtype=torch.float64, device=dev)
        for i in range(0, n, chunk):
            xc = flat[i : i + chunk].to(torch.float64) - mean
            cov += xc.T @ xc
        cov /= n - 1
        lam, u = torch.linalg.eigh(cov)
        lam = lam.clamp_min(0.0)  # rounding leaves tiny negative eigenvalues on rank-deficient data
        if eps == 0 and not bool((lam > 0).all()):
            raise ValueError("ZCA.fit: the covariance is singular (constant pixels or N <= D); give eps > 0")
        transform = (u * (lam + eps).rsqrt()) @ u.T
        inverse = (u * (lam + eps).sqrt()) @ u.T
        return cls(mean.reshape(shape), transform, inverse, eps)

    def _on(self, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (ref.device, ref.dtype)
        if key not in self._cast:
            dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
            self._cast[key] = tuple(t.to(ref.device, dtype) for t in
                                    (self.mean.reshape(1, -1), self.matrix, self.inverse_matrix))
        return self._cast[key]

    def _check(self, x: torch.Tensor, what: str) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"ZCA.{what}: images of shape {tuple(x.shape[1:])}, the whitening was fitted on "
                             f"{self.shape}")

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten the images ``x`` [N, C, H, W]; computed in x's dtype on x's device
        (differentiable with respect to x)."""
        self._check(x, "transform")
        mean, w, _ = self._on(x)
        return ((x.reshape(x.shape[0], -1) - mean) @ w).reshape(x.shape)

    __call__ = transform

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Map whitened images back to pixels: ``inverse(transform(x)) == x`` up to rounding."""
        self._check(z, "inverse")
        mean, _, w_inv = self._on(z)
        return (z.reshape(z.shape[0], -1) @ w_inv + mean).reshape(z.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain contiguous float64 CPU tensors: ``mean`` [C, H, W], ``transform`` and ``inverse``
        [D, D], ``eps`` [1]."""
        return {"mean": self.mean.clone(), "transform": self.matrix.clone(),
                "inverse": self.inverse_matrix.clone(), "eps": torch.tensor([self.eps], dtype=torch.float64)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "ZCA":
        missing = [k for k in ("mean", "transform", "inverse") if k not in state]
        if missing:
            raise ValueError(f"ZCA state lacks {', '.join(missing)}")
        eps = float(state["eps"].reshape(-1)[0]) if "eps" in state else float("nan")
        return cls(state["mean"], state["transform"], state["inverse"], eps)
