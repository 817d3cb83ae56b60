"""Triton kernel bodies (@triton.jit) of the pqpatch ops. Imported only by `kernels.triton_ops`, never by `kernels`.

pq_topk.py       PQ lookup-table scores, per-head softmax statistics, GQA group score and radix selection
sparse_attn.py   split-S (flash-decoding) attention over an index list, GQA group in one program, LSE merge
pq_assign.py     nearest-centroid codes
"""
