"""Build the project's sample model: a small CNN trained on scikit-learn's digits.

Run from the repository root:

    python sample_models/make_digits_cnn.py

Outputs (next to this script):
    digits_cnn.onnx        float32 ONNX model (opset 13), BatchNormalization unfused
    digits_calib/          64 calibration inputs sample_000.npy .. sample_063.npy
    digits_test.npz        labelled held-out set: x float32 [540,1,8,8], y int64 [540]

Needs torch, scikit-learn, onnx, onnxruntime and numpy (``pip install ".[sample]"``).
The run is deterministic: fixed seeds, a single thread, no data download.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
EPOCHS = 40
BATCH = 64
LR = 3e-3
N_CALIB = 64
OUT_DIR = Path(__file__).resolve().parent


def set_determinism(seed: int = SEED) -> None:
    """Fix every random source and use one CPU thread."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def load_data():
    """Return (x_train, x_test, y_train, y_test); x is float32 [N,1,8,8] in [0,1]."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=540, random_state=0, stratify=y)


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, MaxPool, Conv-BN-ReLU, global average pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = torch.relu(self.bn3(self.conv3(x)))
        x = x.mean(dim=(2, 3))
        return self.fc(x)


def augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Randomly shift each image by up to one pixel in each direction (zero fill)."""
    n = xb.shape[0]
    padded = nn.functional.pad(xb, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    out = torch.empty_like(xb)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
    return out


def train(x_train: np.ndarray, y_train: np.ndarray) -> DigitsCNN:
    """Train the CNN with Adam and a cosine learning-rate schedule."""
    model = DigitsCNN()
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=1e-4)
    steps_per_epoch = (len(xt) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, total_steps=EPOCHS * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * BATCH : (s + 1) * BATCH]
            xb = augment(xt[idx], gen)
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  train loss {total / len(xt):.4f}")
    model.eval()
    return model


def to_onnx(model: DigitsCNN) -> onnx.ModelProto:
    """Build the ONNX graph node by node from the trained weights (BN kept unfused)."""
    inits: list[TensorProto] = []

    def add(name: str, t: torch.Tensor) -> str:
        inits.append(numpy_helper.from_array(t.detach().cpu().numpy().astype(np.float32), name))
        return name

    nodes = []

    def conv_bn_relu(i: int, x: str, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> str:
        w = add(f"conv{i}.weight", conv.weight)
        nodes.append(
            helper.make_node(
                "Conv", [x, w], [f"conv{i}_out"], name=f"conv{i}",
                kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1], group=1,
            )
        )
        bn_in = [
            f"conv{i}_out",
            add(f"bn{i}.weight", bn.weight),
            add(f"bn{i}.bias", bn.bias),
            add(f"bn{i}.running_mean", bn.running_mean),
            add(f"bn{i}.running_var", bn.running_var),
        ]
        nodes.append(
            helper.make_node(
                "BatchNormalization", bn_in, [f"bn{i}_out"], name=f"bn{i}",
                epsilon=float(bn.eps), momentum=0.9,
            )
        )
        nodes.append(helper.make_node("Relu", [f"bn{i}_out"], [f"relu{i}_out"], name=f"relu{i}"))
        return f"relu{i}_out"

    h = conv_bn_relu(1, "input", model.conv1, model.bn1)
    h = conv_bn_relu(2, h, model.conv2, model.bn2)
    nodes.append(
        helper.make_node("MaxPool", [h], ["pool_out"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2])
    )
    h = conv_bn_relu(3, "pool_out", model.conv3, model.bn3)
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["gap_out"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten", axis=1))
    nodes.append(
        helper.make_node(
            "Gemm", ["flat_out", add("fc.weight", model.fc.weight), add("fc.bias", model.fc.bias)],
            ["logits"], name="fc", alpha=1.0, beta=1.0, transB=1,
        )
    )

    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13)],
        producer_name="make_digits_cnn.py",
        doc_string="Small CNN trained on sklearn digits (8x8, x/16). Output: 10 logits.",
    )
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def top1(logits: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows whose argmax equals the label."""
    return float((logits.argmax(axis=1) == y).mean())


def main() -> None:
    """Train, export, verify, and write calibration and test data."""
    set_determinism()
    t0 = time.time()
    x_train, x_test, y_train, y_test = load_data()
    print(f"train {x_train.shape}  test {x_test.shape}")

    model = train(x_train, y_train)
    print(f"training took {time.time() - t0:.1f}s")
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()

    m = to_onnx(model)
    onnx_path = OUT_DIR / "digits_cnn.onnx"
    onnx.save(m, str(onnx_path))

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"input": x_test})[0]
    diff = float(np.abs(ort_logits - torch_logits).max())
    print(f"max |onnxruntime - torch| = {diff:.3e}")
    if diff >= 1e-4:
        raise SystemExit(f"onnxruntime/torch mismatch: {diff}")
    print(f"torch float top-1:       {top1(torch_logits, y_test):.4f}")

    calib_dir = OUT_DIR / "digits_calib"
    calib_dir.mkdir(exist_ok=True)
    for old in calib_dir.glob("sample_*.npy"):
        old.unlink()
    pick = np.random.default_rng(SEED).choice(len(x_train), size=N_CALIB, replace=False)
    for k, i in enumerate(sorted(pick)):
        np.save(calib_dir / f"sample_{k:03d}.npy", np.ascontiguousarray(x_train[i : i + 1], dtype=np.float32))

    np.savez(OUT_DIR / "digits_test.npz", x=x_test.astype(np.float32), y=y_test.astype(np.int64))

    acc = top1(ort_logits, y_test)
    print(f"onnxruntime float top-1: {acc:.4f} ({int(round(acc * len(y_test)))}/{len(y_test)})")


if __name__ == "__main__":
    main()
