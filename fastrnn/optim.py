"""Optimizers: configuration only. The update itself runs inside the fused
training step (one loop over the flat parameter buffer), with PyTorch's rules:

SGD:     buf = momentum*buf + g (buf = g at the first step); p -= lr*buf
Adam:    m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
         p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
Adagrad: s += g^2; p -= lr * g / (sqrt(s) + eps)
"""
from ._validate import check_positive


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
        super().__init__(lr=check_positive("lr", lr),
                         momentum=check_positive("momentum", momentum, allow_zero=True))


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with PyTorch's bias correction."""
    kind = "adam"

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}") from None
        b1 = check_positive("betas[0]", b1, allow_zero=True)
        b2 = check_positive("betas[1]", b2, allow_zero=True)
        for n, b in (("betas[0]", b1), ("betas[1]", b2)):
            if b >= 1:
                raise ValueError(f"{n}: expected a value in [0, 1), got {b}")
        super().__init__(lr=check_positive("lr", lr), beta1=b1, beta2=b2,
                         eps=check_positive("eps", eps, allow_zero=True))


class Adagrad(Optimizer):
    """Adagrad (Duchi et al. 2011), PyTorch's form (no lr decay)."""
    kind = "adagrad"

    def __init__(self, lr=1e-1, eps=1e-8):
        super().__init__(lr=check_positive("lr", lr),
                         eps=check_positive("eps", eps, allow_zero=True))
