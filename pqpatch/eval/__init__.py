"""Evaluation harness: passkey / RULER-style NIAH retrieval, next-token KL and attention recall.

The harness prefills each prompt once into a `PQCache` and decodes a fork of it per (method, budget), which is
what makes a grid of methods affordable on a CPU. Entry points: `runner.run_eval` with `runner.EvalSettings`,
`report.write_outputs`, and the `pqpatch eval` command. Importing this package imports torch only.
"""
