"""The conversation: what a chat is, above the engine.

`ChatSession` (session) keeps a conversation and turns it into the engine's work: the chat template
(template), the reply split into reasoning, answer and tool calls (reasoning, tools), the grammars
that constrain an answer (constraints), images and video as context cells (media, video), the token
loop with its drafts (generation), the evaluation of the next prompt's known start between turns
(prefill), conversations saved with their state (saved) and the REPL's journal (journal).

May import: the engine (`..engine`) and `qwen35.system`. Imported by the front ends; never imports them.
"""
