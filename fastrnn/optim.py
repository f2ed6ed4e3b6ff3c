"""Optimizers: configuration only. The update itself runs inside the fused
training step (one loop over the flat parameter buffer), with PyTorch's rules:

SGD:     buf = momentum*buf + g (buf = g at the first step); p -= lr*buf
Adam:    m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
         p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
Adagrad: s += g^2; p -= lr * g / (sqrt(s) + eps)

Argument ranges are PyTorch's (torch.optim): lr >= 0 (lr = 0 is a frozen
step: the moments and the step count advance, the parameters stay),
momentum >= 0, eps >= 0, 0 <= beta < 1; infinities are accepted where
PyTorch accepts them. NaN is refused everywhere (PyTorch's SGD lets it
through). An update that would make a parameter or moment non-finite
(lr = inf, eps = 0 with a zero gradient, an overflowing momentum) is not
applied: the step is skipped as a whole (see TrainStep).
"""
from ._validate import check_range


class Optimizer:
    kind = None

    def __init__(self, **hyper):
        self.hyper = hyper

    @property
    def lr(self):
        return self.hyper["lr"]

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional (heavy-ball) momentum."""
    kind = "sgd"

    def __init__(self, lr, momentum=0.0):
        super().__init__(lr=check_range("lr", lr),
                         momentum=check_range("momentum", momentum))


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with PyTorch's bias correction."""
    kind = "adam"

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}") from None
        b1 = check_range("betas[0]", b1, hi=1.0, hi_open=True)
        b2 = check_range("betas[1]", b2, hi=1.0, hi_open=True)
        super().__init__(lr=check_range("lr", lr), beta1=b1, beta2=b2,
                         eps=check_range("eps", eps))


class Adagrad(Optimizer):
    """Adagrad (Duchi et al. 2011), PyTorch's form (no lr decay)."""
    kind = "adagrad"

    def __init__(self, lr=1e-1, eps=1e-8):
        super().__init__(lr=check_range("lr", lr), eps=check_range("eps", eps))
