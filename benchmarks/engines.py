"""One adapter per engine: import it, load a cached model, generate exactly N new tokens from token ids.

Every adapter has the same four steps, run by worker.py in a process of its own:

    engine.import_modules()                      # timed: the import cost a user pays
    engine.precision = "fp32" | "int8" | "fp16"   # one of engine.precisions; the folder is artifact_for(precision)
    engine.load(model_dir, model, device, threads)
    engine.generate(prompts, new_tokens, mode, seed) -> new ids per sequence   # timed, many times
    engine.versions()

`prompts` is a list of equal-length lists of token ids (batch × prompt_tokens; for T5 they are the encoder input).
`mode` is one of MODES. Every engine is made to emit exactly `new_tokens` tokens (EOS suppressed by a minimum
length equal to the maximum), so that each does the same work; worker.py checks the count.

Imports of the engines' packages happen only inside import_modules(), so the measured import time is the engine's.
"""

from __future__ import annotations

import inspect
import json
import os

# mode name -> (do_sample, num_beams). Sampling is top-k 50, temperature 1 everywhere (transformers' defaults).
MODES = {"greedy": (False, 1), "sample": (True, 1), "beam4": (False, 4)}
TOP_K = 50


class Engine:
    name = ""
    artifact = ""  # folder of benchmarks/.cache/<model>/ it loads (fp32)
    families = ("gpt2", "t5")
    precisions = ("fp32",)
    precision = "fp32"

    def unsupported(self, family: str, mode: str, device: str, precision: str = "fp32") -> str | None:
        """Why this engine cannot run the cell, or None."""
        if family == "t5" and precision != "fp32" and self.name == "optimum":
            return f"{self.name}: T5 is measured at fp32 only"
        if family == "t5" and precision == "fp16" and self.name == "onnxgen":
            return "onnxgen: T5's fused graphs are fp32 or int8"
        if family not in self.families:
            return f"{self.name} has no {family} support"
        if precision not in self.precisions:
            return f"{self.name} is measured at {', '.join(self.precisions)} only"
        return None

    @classmethod
    def artifact_for(cls, precision: str) -> str:
        """The folder holding the model at `precision`: `artifact`, or `artifact-<precision>` where the
        weights themselves differ (an engine that quantizes at load time keeps one folder)."""
        return cls.artifact if precision == "fp32" else f"{cls.artifact}-{precision}"

    def import_modules(self) -> None:
        raise NotImplementedError

    def load(self, model_dir: str, family: str, device: str, threads: int) -> None:
        raise NotImplementedError

    def generate(self, prompts: list[list[int]], new_tokens: int, mode: str, seed: int) -> list[list[int]]:
        raise NotImplementedError

    def versions(self) -> dict:
        return {}

    def settings(self) -> dict:
        """How the engine was configured (threads, provider, ...), recorded with each result."""
        return {}


# ---------------------------------------------------------------------------------------------- PyTorch

class _TorchGenerate(Engine):
    """Shared by transformers and Optimum: both run transformers' generate() over torch tensors."""

    def _generate_kwargs(self, new_tokens: int, mode: str) -> dict:
        do_sample, beams = MODES[mode]
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=do_sample, num_beams=beams,
                  num_return_sequences=1, pad_token_id=self.pad_id)
        if do_sample:
            kw.update(top_k=TOP_K, top_p=1.0, temperature=1.0)
        return kw

    def generate(self, prompts, new_tokens, mode, seed):
        torch = self.torch
        ids = torch.tensor(prompts, dtype=torch.long, device=self.torch_device)
        mask = torch.ones_like(ids)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **self._generate_kwargs(new_tokens, mode))
        if self.torch_device == "cuda":
            torch.cuda.synchronize()
        # Decoder-only output repeats the prompt; T5's starts with the decoder start token.
        start = ids.shape[1] if self.family == "gpt2" else 1
        return out[:, start:].tolist()

    def versions(self):
        import transformers
        return {"torch": self.torch.__version__, "transformers": transformers.__version__}


class Transformers(_TorchGenerate):
    name = "transformers"
    artifact = "hf"

    def import_modules(self):
        import torch
        import transformers  # noqa: F401
        from transformers import GPT2LMHeadModel, T5ForConditionalGeneration  # noqa: F401 (lazy modules)
        self.torch = torch

    def load(self, model_dir, family, device, threads):
        import transformers
        torch = self.torch
        torch.set_num_threads(threads)
        self.family, self.torch_device, self.threads = family, device, threads
        cls = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.T5ForConditionalGeneration
        self.model = cls.from_pretrained(model_dir).eval().to(device)
        self.pad_id = self.model.config.eos_token_id if family == "gpt2" else self.model.config.pad_token_id

    def settings(self):
        return {"torch_threads": self.torch.get_num_threads(), "dtype": "float32"}


class Optimum(_TorchGenerate):
    name = "optimum"
    artifact = "optimum"
    # int8: onnxruntime's optimizer + dynamic quantization of its export; fp32opt: the optimizer alone
    precisions = ("fp32", "int8", "fp32opt")

    def import_modules(self):
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForSeq2SeqLM  # noqa: F401
        self.torch = torch

    def load(self, model_dir, family, device, threads):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForSeq2SeqLM
        self.torch.set_num_threads(threads)
        self.family, self.torch_device = family, device
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        cls = ORTModelForCausalLM if family == "gpt2" else ORTModelForSeq2SeqLM
        self.model = cls.from_pretrained(model_dir, provider=self.provider, session_options=so, use_cache=True,
                                         use_io_binding=device == "cuda")
        self.pad_id = self.model.config.eos_token_id if family == "gpt2" else self.model.config.pad_token_id
        self.threads = threads

    def versions(self):
        import importlib.metadata as md
        import onnxruntime
        v = super().versions()
        v.update(optimum=md.version("optimum"), optimum_onnx=md.version("optimum-onnx"),
                 onnxruntime=onnxruntime.__version__)
        return v

    def settings(self):
        return {"intra_op_num_threads": self.threads, "provider": self.provider,
                "io_binding": self.torch_device == "cuda"}


# ---------------------------------------------------------------------------------------------- CTranslate2

class CTranslate2(Engine):
    name = "ctranslate2"
    artifact = "ct2"
    precisions = ("fp32", "int8")  # int8: quantized when the converted model is loaded

    @classmethod
    def artifact_for(cls, precision: str) -> str:
        return cls.artifact

    def import_modules(self):
        import ctranslate2
        self.ct2 = ctranslate2

    def load(self, model_dir, family, device, threads):
        ct2 = self.ct2
        self.family, self.threads = family, threads
        self.compute_type = {"fp32": "float32", "int8": "int8"}[self.precision]
        kw = dict(device=device, compute_type=self.compute_type, intra_threads=threads, inter_threads=1)
        if family == "gpt2":
            self.model = ct2.Generator(model_dir, **kw)
            vocab_file = "vocabulary.json"
        else:
            self.model = ct2.Translator(model_dir, **kw)
            vocab_file = "shared_vocabulary.json"
        with open(os.path.join(model_dir, vocab_file)) as f:
            self.vocab = json.load(f)  # CTranslate2 takes token strings, not ids
        self.ids = {t: i for i, t in enumerate(self.vocab)}

    def generate(self, prompts, new_tokens, mode, seed):
        do_sample, beams = MODES[mode]
        tokens = [[self.vocab[i] for i in p] for p in prompts]
        kw = dict(beam_size=beams)
        if do_sample:
            self.ct2.set_random_seed(seed)
            kw.update(sampling_topk=TOP_K, sampling_temperature=1.0)
        if self.family == "gpt2":
            res = self.model.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens,
                                            include_prompt_in_result=False, **kw)
        else:
            res = self.model.translate_batch(tokens, max_decoding_length=new_tokens,
                                             min_decoding_length=new_tokens, max_input_length=0, **kw)
            return [[self.ids[t] for t in r.hypotheses[0]] for r in res]  # the Translator returns strings only
        return [r.sequences_ids[0] for r in res]

    def versions(self):
        return {"ctranslate2": self.ct2.__version__}

    def settings(self):
        return {"intra_threads": self.threads, "compute_type": self.compute_type}


# ---------------------------------------------------------------------------------------------- onnxruntime-genai

class Genai(Engine):
    name = "genai"
    artifact = "genai"
    families = ("gpt2",)
    # int8 / fp32opt: the graph Optimum's row of that precision runs, through genai's generic decoder
    precisions = ("fp32", "int8", "fp32opt")

    def import_modules(self):
        import numpy
        import onnxruntime_genai
        self.og, self.np = onnxruntime_genai, numpy

    def load(self, model_dir, family, device, threads):
        og = self.og
        config = og.Config(model_dir)
        config.clear_providers()
        if device == "cuda":
            config.append_provider("cuda")
        session = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        self.model = og.Model(config)
        self.threads, self.device = threads, device

    def generate(self, prompts, new_tokens, mode, seed):
        og = self.og
        do_sample, beams = MODES[mode]
        batch, length = len(prompts), len(prompts[0])
        params = og.GeneratorParams(self.model)
        opts = dict(max_length=length + new_tokens, min_length=length + new_tokens, do_sample=do_sample,
                    num_beams=beams, batch_size=batch, num_return_sequences=1, random_seed=seed)
        if do_sample:
            opts.update(top_k=TOP_K, top_p=1.0, temperature=1.0)
        params.set_search_options(**opts)
        gen = og.Generator(self.model, params)
        gen.append_tokens(self.np.asarray(prompts, dtype=self.np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        return [gen.get_sequence(i)[length:].tolist() for i in range(batch)]

    def versions(self):
        import onnxruntime
        return {"onnxruntime_genai": self.og.__version__, "onnxruntime": onnxruntime.__version__}

    def settings(self):
        return {"intra_op_num_threads": self.threads, "provider": "cuda" if self.device == "cuda" else "cpu"}


# ---------------------------------------------------------------------------------------------- onnxgen

class Onnxgen(Engine):
    """onnxgen's runtime: TextGeneration(model_dir, device=...).generate_ids(prompts, ...)."""

    name = "onnxgen"
    artifact = "onnxgen"
    precisions = ("fp32", "int8", "fp16", "fp32opt")  # fp32opt: its own fp32 graphs, against optimized peers

    @classmethod
    def artifact_for(cls, precision: str) -> str:
        return cls.artifact if precision in ("fp32", "fp32opt") else f"{cls.artifact}-{precision}"
    _THREAD_ARGS = ("intra_op_threads", "intra_op_num_threads", "num_threads", "threads")

    def import_modules(self):
        import onnxgen
        self.onnxgen = onnxgen
        self.TextGeneration = onnxgen.TextGeneration  # AttributeError until the runtime API lands

    def load(self, model_dir, family, device, threads):
        kw = {"device": device}
        params = inspect.signature(self.TextGeneration).parameters
        self.thread_arg = next((a for a in self._THREAD_ARGS if a in params), None)
        if self.thread_arg:
            kw[self.thread_arg] = threads
        self.tg = self.TextGeneration(model_dir, **kw)
        self.threads, self.family = threads, family

    def generate(self, prompts, new_tokens, mode, seed):
        do_sample, beams = MODES[mode]
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=do_sample, num_beams=beams,
                  seed=seed)
        if do_sample:
            kw.update(top_k=TOP_K, top_p=1.0, temperature=1.0)  # onnxgen's GPT-2 default temperature differs
        out = self.tg.generate_ids(prompts, **kw)
        # One list of sequences per prompt (num_return_sequences); the first is the best beam.
        out = [o[0] if o and isinstance(o[0], (list, tuple)) else o for o in out]
        out = [list(map(int, o)) for o in out]
        # Accept either the new ids alone or the prompt followed by them.
        return [o[len(p):] if len(o) == len(p) + new_tokens and o[:len(p)] == p else o for o, p in zip(out, prompts)]

    def versions(self):
        import importlib.metadata as md
        import hashlib
        from pathlib import Path
        digest = hashlib.sha256()
        root = Path(self.onnxgen.__file__).parent
        for f in sorted(root.rglob("*.py")):  # the runtime under test changes daily: record which one ran
            digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
        v = {"onnxgen": getattr(self.onnxgen, "__version__", None) or md.version("onnxgen"),
             "onnxgen_runtime_src": digest.hexdigest()[:16]}
        try:
            import onnxruntime
            v["onnxruntime"] = onnxruntime.__version__
        except ImportError:
            pass
        return v

    def settings(self):
        # Without a thread argument onnxgen runs with its own default; OMP/ORT see the pinned env vars anyway.
        return {self.thread_arg or "threads(default, env pinned)": self.threads}


ENGINES = {e.name: e for e in (Onnxgen, Transformers, Optimum, CTranslate2, Genai)}
