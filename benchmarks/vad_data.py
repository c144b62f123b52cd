"""Noisy synthetic speech with chunk-level ground truth for silero-vad (silero-vad==6.2.3).

espeak-ng utterances (random words, voices, speeds, pitches), resampled to 16 kHz, placed with
silence gaps and mixed with white/pink/brown noise at 5-30 dB SNR (some with mains hum).  Labels
come from the clean speech, one per 512-sample chunk.  ``VadStream`` streams a silero 16 kHz ONNX
model exactly like the package's ``OnnxWrapper`` (64-sample context, recurrent state, int64 sr).

    clips = make_clips(32, seed=0)
    stream = VadStream(vad_model_path())
    print(frame_metrics([stream.probs(c.audio) for c in clips], [c.labels for c in clips]))

``python benchmarks/vad_data.py [N]`` is a smoke run of the float models on N clips.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

SR, CHUNK, CONTEXT = 16000, 512, 64  # silero 16 kHz: 512-sample chunks, 64 samples of context
VOICES = ["en", "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
          "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
VARIANTS = ["", "+m1", "+m3", "+m7", "+f1", "+f2", "+f3", "+f4", "+klatt", "+klatt4"]
WORDS = ("the a one two three seven ten we you they people time year day week morning evening "
         "water house street city train station window garden market river music picture friend "
         "doctor teacher child family letter number question answer problem idea weather coffee "
         "dinner paper computer phone table door road car bridge mountain is was will can should "
         "could must have made took gave found said told asked went came left opened closed "
         "started finished wanted needed bought sold walked talked listened called moved changed "
         "remember believe understand quickly slowly really never always often again today "
         "tomorrow yesterday here there very almost only also still later soon together outside "
         "inside big small old new long short good bad bright dark early late quiet loud warm "
         "cold happy important different simple strange beautiful and but or because if when "
         "while after before with without about from into over under through").split()


@dataclass
class Clip:
    """One test clip: 16 kHz float32 mono audio, a speech flag per 512-sample chunk, its SNR."""
    audio: np.ndarray
    labels: np.ndarray
    snr_db: float = float("nan")


def vad_model_path(name: str = "silero_vad_16k_op15.onnx") -> Path:
    """An ONNX file shipped in the installed silero_vad package (the models under test)."""
    try:
        from importlib.resources import files
        path = Path(str(files("silero_vad") / "data" / name))
    except ModuleNotFoundError:
        sys.exit("silero-vad is not installed: pip install silero-vad==6.2.3")
    if not path.is_file():
        sys.exit(f"{name} is not in the silero_vad package data folder {path.parent}")
    return path


def _espeak(voice: str, speed: int, pitch: int, text: str) -> np.ndarray:
    """One utterance at 16 kHz; espeak-ng streams a 22050 Hz int16 WAV (lengths unset) to stdout."""
    try:
        raw = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch),
                              "--stdout", text], capture_output=True, check=True).stdout
    except FileNotFoundError:
        sys.exit("espeak-ng not found (apt-get install espeak-ng)")
    pcm = np.frombuffer(raw[raw.index(b"data") + 8:], "<i2").astype(np.float32) / 32768
    return _resample(pcm, int.from_bytes(raw[24:28], "little"), SR)


def _resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited FFT resampling (ideal low-pass).  Zero padding to 5-smooth FFT sizes keeps it
    fast; it is harmless because espeak-ng utterances start and end in silence."""
    if rate == target or len(x) == 0:
        return x
    up, down = target // math.gcd(rate, target), rate // math.gcd(rate, target)
    q = -(-len(x) // down)
    while not _smooth(q):
        q += 1
    y = np.fft.irfft(np.fft.rfft(x, n=q * down)[: q * up // 2 + 1], n=q * up) * (up / down)
    return y[: round(len(x) * up / down)].astype(np.float32)


def _smooth(q: int) -> bool:
    """True if q has no prime factor above 5."""
    for p in (2, 3, 5):
        while q % p == 0:
            q //= p
    return q == 1


def _speech_mask(x: np.ndarray, db: float = -35.0, bridge_s: float = 0.2) -> np.ndarray:
    """Samples whose 20 ms RMS is within `db` of the utterance peak; pauses < bridge_s filled."""
    c, i, half = np.concatenate([[0.0], np.cumsum(np.float64(x) ** 2)]), np.arange(len(x)), 160
    rms = np.sqrt((c[np.minimum(i + half, len(x))] - c[np.maximum(i - half, 0)]) / (2 * half))
    mask = rms > rms.max() * 10 ** (db / 20)
    step = np.diff(mask.astype(np.int8))
    starts, ends = np.flatnonzero(step < 0) + 1, np.flatnonzero(step > 0) + 1  # pauses [start, end)
    ends = ends[ends > starts[0]] if len(starts) else ends[:0]  # interior pauses only
    starts = starts[: len(ends)]
    short = ends - starts < bridge_s * SR
    fill = np.zeros(len(x) + 1, np.int32)
    np.add.at(fill, starts[short], 1)
    np.add.at(fill, ends[short], -1)
    return mask | (np.cumsum(fill[:-1]) > 0)


def _colored_noise(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Unit-RMS white, pink (1/f power) or brown (1/f^2 power, flat below 20 Hz) noise."""
    f = np.maximum(np.fft.rfftfreq(n, 1 / SR), 20.0)
    shape = {"white": 1.0, "pink": f ** -0.5, "brown": f ** -1.0}[kind]
    noise = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * shape, n=n)
    return noise / np.sqrt(np.mean(noise ** 2))


def _clip_spec(rng: np.random.Generator) -> tuple[list[tuple], np.ndarray, int]:
    """Random utterances (voice, speed, pitch, text), the gap before each and the clip length."""
    utts = [(str(rng.choice(VOICES)) + str(rng.choice(VARIANTS)), int(rng.integers(130, 201)),
             int(rng.integers(20, 81)), " ".join(rng.choice(WORDS, size=int(rng.integers(3, 11)))))
            for _ in range(5)]
    return utts, rng.uniform(0.3, 2.0, size=5), int(rng.uniform(6, 12) * SR) // CHUNK * CHUNK


def _speech_track(spec: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Clean speech and its sample mask: utterances placed after their gaps while they fit."""
    utts, gaps, total = spec
    clean, mask, pos = np.zeros(total, np.float32), np.zeros(total, bool), 0
    for gap, utt in zip(gaps, utts):
        pos += int(gap * SR)
        if pos >= total:
            break
        w = _espeak(*utt)
        if pos + len(w) > total and mask.any():  # the first utterance is always kept (cut)
            break
        w = w[: total - pos]
        clean[pos:pos + len(w)], mask[pos:pos + len(w)] = w, _speech_mask(w)
        pos += len(w)
    return clean, mask


def make_clips(n: int, seed: int) -> list[Clip]:
    """n deterministic 6-12 s noisy clips with ground-truth chunk labels from the clean speech."""
    rngs = [np.random.default_rng([seed, i]) for i in range(n)]
    with ThreadPoolExecutor(8) as pool:  # espeak-ng runs dominate; each clip has its own rng
        tracks = list(pool.map(_speech_track, [_clip_spec(r) for r in rngs]))
    clips = []
    for rng, (clean, mask) in zip(rngs, tracks):
        speech_rms, snr = np.sqrt(np.mean(clean[mask] ** 2)), float(rng.uniform(5, 30))
        kind = str(rng.choice(["white", "pink", "brown"]))
        noise = _colored_noise(rng, len(clean), kind) * speech_rms / 10 ** (snr / 20)
        if rng.random() < 0.3:  # mains hum with two harmonics, 25-40 dB below the speech
            t = np.arange(len(clean)) * (2 * np.pi * rng.choice([50.0, 60.0]) / SR)
            hum = sum(np.sin(h * t + rng.uniform(0, 2 * np.pi)) / h for h in (1, 2, 3))
            noise += hum * speech_rms * 10 ** (-rng.uniform(25, 40) / 20)
        audio = clean + noise
        audio *= rng.uniform(0.1, 0.9) / np.abs(audio).max()
        labels = mask.reshape(-1, CHUNK).mean(axis=1) >= 0.5
        clips.append(Clip(audio.astype(np.float32), labels, snr))
    return clips


class VadStream:
    """Streams audio through a silero 16 kHz model the way silero_vad's OnnxWrapper does.

    Any variant with ``input`` [batch, 576] and recurrent inputs (``state``, or ``h`` and ``c``)
    updated by the outputs after the first, with or without ``sr``, streams the same way.
    """

    _DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
               "tensor(int64)": np.int64}

    def __init__(self, model: ort.InferenceSession | str | Path):
        if not isinstance(model, ort.InferenceSession):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1  # as OnnxWrapper
            opts.log_severity_level = 3  # some variants warn about unused initializers
            model = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self.session = model
        inputs = {i.name: i for i in model.get_inputs()}
        self.dtypes = {k: self._DTYPES.get(i.type) for k, i in inputs.items()}
        self.states = [k for k in inputs if k not in ("input", "sr")]
        self.shapes = [[d if isinstance(d, int) else 1 for d in inputs[k].shape]
                       for k in self.states]  # dynamic batch -> 1
        if "input" not in inputs or len(model.get_outputs()) != 1 + len(self.states):
            raise ValueError(f"not a streaming silero interface: inputs {list(inputs)}, "
                             f"outputs {[o.name for o in model.get_outputs()]}")

    def _run(self, audio: np.ndarray, keep: bool) -> tuple[np.ndarray, list[dict]]:
        n = len(audio) // CHUNK
        frames = np.asarray(audio[: n * CHUNK], np.float32).reshape(n, CHUNK)
        context = np.concatenate([np.zeros((1, CONTEXT), np.float32), frames[:-1, -CONTEXT:]])[:n]
        windows = np.concatenate([context, frames], axis=1).astype(self.dtypes["input"])
        state = [np.zeros(s, self.dtypes[k]) for k, s in zip(self.states, self.shapes)]
        extra = {"sr": np.array(SR, self.dtypes["sr"])} if "sr" in self.dtypes else {}
        probs, feeds = np.zeros(n, np.float32), []
        for i in range(n):
            feed = {"input": windows[i:i + 1], **dict(zip(self.states, state)), **extra}
            out, *state = self.session.run(None, feed)
            probs[i] = np.asarray(out).reshape(-1)[0]
            if keep:
                feeds.append(feed)
        return probs, feeds

    def probs(self, audio: np.ndarray) -> np.ndarray:
        """Speech probability per full 512-sample chunk; state and context start at zero."""
        return self._run(audio, keep=False)[0]

    def feeds(self, audio: np.ndarray) -> list[dict[str, np.ndarray]]:
        """The per-chunk input dicts the model saw: realistic recurrent states for calibration."""
        return self._run(audio, keep=True)[1]


def write_calibration(folder: Path, clips, model_path, every: int = 4) -> int:
    """Every `every`-th chunk's inputs (states from the float model) as folder/sample_XXXXX.npz."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stream = VadStream(model_path)
    feeds = [f for clip in clips for f in stream.feeds(clip.audio)][::every]
    for i, feed in enumerate(feeds):
        np.savez(folder / f"sample_{i:05d}.npz", **feed)
    return len(feeds)


def frame_metrics(probs, labels, threshold: float = 0.5) -> dict:
    """Chunk-level speech-class F1, accuracy, precision and recall (prob >= threshold = speech)."""
    if isinstance(probs, (list, tuple)):
        probs, labels = np.concatenate(probs), np.concatenate(labels)
    pred, truth = np.asarray(probs) >= threshold, np.asarray(labels, bool)
    tp, fp, fn = np.sum(pred & truth), np.sum(pred & ~truth), np.sum(~pred & truth)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": float(f1), "accuracy": float(np.mean(pred == truth)),
            "precision": float(precision), "recall": float(recall)}


if __name__ == "__main__":
    n_clips = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    t0 = time.perf_counter()
    clips = make_clips(n_clips, seed=0)
    labels, seconds = [c.labels for c in clips], sum(len(c.audio) for c in clips) / SR
    print(f"{n_clips} clips, {seconds:.0f} s audio, {np.mean(np.concatenate(labels)):.0%} speech "
          f"chunks, made in {time.perf_counter() - t0:.1f} s")
    names = ["silero_vad_16k_op15.onnx", "silero_vad.onnx", "silero_vad_op18_ifless.onnx",
             "silero_vad_16k_sequence.onnx", "silero_vad_half.onnx", "silero_vad_openvino_16k.onnx"]
    for name in names:
        try:
            stream = VadStream(vad_model_path(name))
        except ValueError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        t0 = time.perf_counter()
        probs = [stream.probs(c.audio) for c in clips]
        took = time.perf_counter() - t0
        print(f"{name}: inputs {[(i.name, i.shape, i.type) for i in stream.session.get_inputs()]}")
        for i, p in enumerate(probs if name == names[0] else []):
            m = frame_metrics(p, labels[i])
            print(f"  clip {i:2d}  snr {clips[i].snr_db:4.1f} dB  f1 {m['f1']:.3f}  "
                  f"acc {m['accuracy']:.3f}")
        m = frame_metrics(probs, labels)
        print(f"  total f1 {m['f1']:.4f} acc {m['accuracy']:.4f} precision {m['precision']:.4f} "
              f"recall {m['recall']:.4f}  ({took:.2f} s, {took / seconds * 1e3:.1f} ms/audio s)")
