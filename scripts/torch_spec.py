"""A PyTorch (CPU) peer of any architecture spec of this project (`crates/mnist-models/specs/*.json`, `--arch`
files), trained with the `improved` recipe of the anchor `torch_improved.py`, so that the speed comparison always
runs the peer on the very architecture our default model has, whatever the spec file says today.

The model is built from the spec as `mnist-models` lowers it: conv blocks (convolution, activation, BatchNorm
after or before the activation, optional max-pool), separable convolutions (depthwise without bias, then the
pointwise with the block's bias), max-pool, BatchNorm, dropout, flatten, global average pooling, dense and
inception modules (branches concatenated along the channels, an optional BatchNorm after). Keras `same` padding
(`ceil(n / stride)` outputs, the odd cell at the end; -inf for pooling), BatchNorm eps and momentum from the spec.
The parameter count (BatchNorm statistics included, as Keras and this project count them) is printed first so a
caller can check it matches ours.

Recipe (the anchor's): Adam (eps 1e-7), one-cycle max 1e-2 (25% warm-up from max/25, cosine to max/25/1e3, per
step), batch 64, random rotation +-10 deg, shift +-2 px, scale 0.9-1.1, plain images in the last epoch for
separable and inception.

Usage: torch_spec.py SPEC.json SOLUTION EPOCHS   (run with the anchors folder on PYTHONPATH)
Env: SEED (default 0), THREADS (default 2), LIMIT (use only the first N training images).
Prints `epoch N wall_s S train_s S val_acc A` per epoch, `test_acc`, then inference throughput (batch 1000)."""
import json
import math
import os
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F

import mnist_np
from torch_improved import augment
from torch_seed import counts, evaluate, keras_init, throughput

torch.set_num_threads(int(os.environ.get("THREADS", "2")))


class SamePad(nn.Module):
    """Keras `same` padding for a k x k window at `stride`: `ceil(n / stride)` outputs, the odd cell at the end."""

    def __init__(self, k, stride, value=0.0):
        super().__init__()
        self.k, self.stride, self.value = k, stride, value

    def forward(self, x):
        pads = []
        for n in (x.shape[3], x.shape[2]):
            total = max((math.ceil(n / self.stride) - 1) * self.stride + self.k - n, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads, value=self.value) if any(pads) else x


def pool(spec):
    k, stride = spec["kernel"], spec.get("stride") or spec["kernel"]
    layers = [SamePad(k, stride, float("-inf"))] if spec.get("padding") == "same" else []
    return layers + [nn.MaxPool2d(k, stride)]


class Concat(nn.Module):
    def __init__(self, branches):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], 1)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): each channel times sigmoid(expand(relu(reduce(its mean))))."""

    def __init__(self, c, units):
        super().__init__()
        self.reduce, self.expand = nn.Linear(c, units), nn.Linear(units, c)

    def forward(self, x):
        g = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3))))))
        return x * g[:, :, None, None]


class Tied(nn.Module):
    """The convolution `conv`'s weights and bias applied again at `stride` (a spec's "weights_of")."""

    def __init__(self, conv, stride):
        super().__init__()
        self.conv, self.stride = conv, stride

    def forward(self, x):
        c = self.conv
        return F.conv2d(x, c.weight, c.bias, self.stride, groups=c.groups)


class Keep(nn.Module):
    """Keeps its input, the input of layer `n`, in `store` for a residual shortcut; passes it on."""

    def __init__(self, store, n):
        super().__init__()
        self.store, self.n = store, n

    def forward(self, x):
        self.store[self.n] = x
        return x


class AddKept(nn.Module):
    """Adds the input kept for layer `n` (a spec's "shortcut")."""

    def __init__(self, store, n):
        super().__init__()
        self.store, self.n = store, n

    def forward(self, x):
        return x + self.store[self.n]


def layers(specs, c, bn):
    """The torch layers of a list of layer specs on `c` input channels, and the channels they output."""
    out = []
    convs = {}  # the convolution modules of each conv layer, by index, for "weights_of" (weight tying)
    store = {}  # the inputs kept for residual shortcuts, by layer index
    kept = {s["shortcut"] for s in specs if "shortcut" in s}
    for i, s in enumerate(specs):
        t = s["type"]
        if i in kept:
            out.append(Keep(store, i))
        if t in ("conv", "separable_conv"):
            k, stride, bias = s["kernel"], s.get("stride", 1), s.get("bias", True)
            if s.get("padding") == "same":
                out.append(SamePad(k, stride))
            if "weights_of" in s:
                # The owner's convolutions again, at this layer's stride: one set of parameters, counted once.
                owner = convs[s["weights_of"]]
                mods = [Tied(owner[0], stride)] + [Tied(m, 1) for m in owner[1:]]
            elif t == "conv":
                mods = [nn.Conv2d(c, s["filters"], k, stride, bias=bias)]
            else:
                mods = [nn.Conv2d(c, c, k, stride, groups=c, bias=False), nn.Conv2d(c, s["filters"], 1, bias=bias)]
            convs[i] = mods
            out += mods
            c = s["filters"]
            act = [nn.ReLU()] if s.get("activation", "relu") == "relu" else []
            place = s.get("batch_norm", "none")
            out += ([bn(c)] + act) if place == "before" else (act + [bn(c)]) if place == "after" else act
            if s.get("pool"):
                out += pool(s["pool"])
            if "shortcut" in s:
                out.append(AddKept(store, s["shortcut"]))
        elif t == "max_pool":
            out += pool(s)
        elif t == "batch_norm":
            out.append(bn(c))
        elif t == "dropout":
            out.append(nn.Dropout(s["rate"]))
        elif t == "flatten":
            out.append(nn.Flatten())
        elif t == "global_avg_pool":
            out += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        elif t == "dense":
            out.append(nn.LazyLinear(s["units"]))
            c = s["units"]
            if s.get("activation") == "relu":
                out.append(nn.ReLU())
        elif t == "squeeze_excite":
            out.append(SqueezeExcite(c, s["units"]))
        elif t == "inception":
            branches, total = [], 0
            for b in s["branches"]:
                mods, cb = layers(b, c, bn)
                branches.append(nn.Sequential(*mods))
                total += cb
            out.append(Concat(branches))
            c = total
            if s.get("batch_norm"):
                out.append(bn(c))
        else:
            sys.exit(f"error: layer type '{t}' is not known to torch_spec.py")
    return out, c


def model_of(spec):
    """The spec's model, its lazy dense layers sized by one forward pass, with Keras's initialisation."""
    b = spec.get("batch_norm", {})
    momentum, eps = b.get("momentum", 0.99), b.get("eps", 1e-3)
    bn = lambda c: nn.BatchNorm2d(c, eps=eps, momentum=1 - momentum)
    model = nn.Sequential(*layers(spec["layers"], 1, bn)[0])
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    return keras_init(model)


if __name__ == "__main__":
    path, which, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seed = int(os.environ.get("SEED", "0"))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with open(path) as f:
        spec = json.load(f)
    model = model_of(spec)
    total, trainable = counts(model)
    print(spec.get("name", path), "params", total, "trainable", trainable, "torch", torch.__version__,
          "threads", torch.get_num_threads(), flush=True)
    xtr, ytr, xte, yte = mnist_np.load()
    to_x = lambda a: torch.from_numpy(a.astype("float32") / 255).unsqueeze(1)
    to_y = lambda a: torch.from_numpy(a.astype("int64"))
    xtr, ytr, xte, yte = to_x(xtr), to_y(ytr), to_x(xte), to_y(yte)
    xv, yv, xtr, ytr = xtr[54000:], ytr[54000:], xtr[:54000], ytr[:54000]
    if os.environ.get("LIMIT"):
        xtr, ytr = xtr[:int(os.environ["LIMIT"])], ytr[:int(os.environ["LIMIT"])]
    ntr, bs = len(xtr), 64
    steps = math.ceil(ntr / bs) * epochs
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-7)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps, pct_start=0.25,
                                                div_factor=25, final_div_factor=1e3, cycle_momentum=False)
    clean = 1 if which in ("separable", "inception") else 0
    for e in range(epochs):
        t = time.time()
        model.train()
        perm = torch.randperm(ntr)
        for i in range(0, ntr, bs):
            idx = perm[i:i + bs]
            xb = xtr[idx]
            if e < epochs - clean:
                xb = augment(xb, gen)
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        train_s = time.time() - t
        vacc, _ = evaluate(model, xv, yv)
        print(f"epoch {e+1} wall_s {time.time()-t:.1f} train_s {train_s:.1f} val_acc {vacc:.4f}", flush=True)
    acc, loss = evaluate(model, xte, yte)
    print(f"test_acc {acc:.4f} test_loss {loss:.4f}", flush=True)
    ips, med = throughput(model, xte)
    print(f"infer batch 1000 median_s {med:.4f} imgs_per_s {ips:.0f}", flush=True)
