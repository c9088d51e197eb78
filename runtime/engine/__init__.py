"""The engine: llama.cpp and this machine.

Loading a GGUF and deciding where its weights go (native, cpu, amx_probe, repack), what it will
cost in memory (memory, modelfile), evaluating and sampling tokens in a context (native), the
checkpoints of the recurrent state that let a conversation go on without being read again
(state_cache), drafting with the model's multi-token-prediction head (speculative), how many
threads to run while other programs take cores (adaptive_threads), the vision projector (vision:
llama.cpp's mtmd), and what was measured once on this machine and is kept (remembered). Nothing here knows a chat template, a message or an API.

May import: `qwen35.gguf_header`, `qwen35.system`, `qwen35.convert` (its profiles, for the memory
estimate) and llama-cpp-python. Imported by the conversation and the front ends, never the other way.
"""
