"""The front ends: thin ways in to a conversation.

`qwen35 run` (run: one-shot and the REPL, repl), `qwen35 bench` (bench) and `qwen35 serve`, the
OpenAI-compatible server (server). Each translates its input onto `ChatSession` and its output back;
none holds prompt or tool logic of its own.

May import: the conversation and the engine. Imported by `qwen35.cli` and `qwen35.runtime`'s public names.
"""
