"""Paged-KV inference for the reference GPT: block allocator with copy-on-write and prefix
caching, continuous-batching scheduler with preemption, sampling, ``LLM``.

    llm = px.inference.LLM(model, tokenizer=ByteTokenizer(), block_size=16, max_num_seqs=64)
    outs = llm.generate(["The ", "Once"], px.inference.SamplingParams(max_tokens=64, temperature=0.8, top_p=0.95))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason
    for partial in llm.stream(prompts, params): ...
    llm.stats()   # blocks used / free / cached, prefix-cache hit rate, KV waste
"""

from parallax.inference.block_manager import BlockManager, KVCacheStats
from parallax.inference.engine import LLM, EngineConfig, LLMEngine
from parallax.inference.model_runner import ModelRunner
from parallax.inference.sampling import SamplingParams
from parallax.inference.scheduler import Scheduler
from parallax.inference.sequence import CompletionOutput, RequestOutput, TokenLogprob

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "TokenLogprob",
           "BlockManager", "KVCacheStats", "Scheduler", "ModelRunner"]
