"""Heads: the classifier that turns support embeddings into query predictions (base.py has the
contract), one file per head with its paper at the top and one `conf/head/NAME.yaml` each.

Inductive: centroid, cosine, simpleshot, logreg, ridge, r2d2, svm, finetune.
Transductive: tim, laplacianshot, bdcspn, ptmap, transductive_finetune.

`head=NAME` trains an embedding learner through a differentiable head (`algorithm=protonet
head=svm`); `eval.head=NAME` tests any learner that embeds its episodes with another head
(`metarun-eval RUN eval.head=logreg`), on the same fixed episodes.
"""
