#!/bin/bash
# A Megatron-LM launch of a small hybrid (Mamba-style pattern) with TP=2, CP=2 on 8 GPUs.
GPUS_PER_NODE=8
SEQ_LEN=4096
DATA_PATH=/data/pile/pile_text_document

DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes 1
    --master_addr localhost
    --master_port 6000
)

MODEL_ARGS=(
    --use-mcore-models
    --num-layers 16
    --hybrid-override-pattern "M-M-M-*-M-M-M-*-"
    --hidden-size 256
    --ffn-hidden-size 704
    --num-attention-heads 8
    --group-query-attention
    --num-query-groups 2
    --seq-length ${SEQ_LEN}
    --max-position-embeddings ${SEQ_LEN}
    --position-embedding-type rope
    --rotary-base 500000
    --normalization RMSNorm
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --init-method-std 0.01
    --mamba-state-dim 128
)

TRAINING_ARGS=(
    --micro-batch-size 1 --global-batch-size 32   # two per line
    --train-iters 1000 --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 100
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
    --bf16
    --recompute-granularity full --recompute-method uniform
)

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 2
    --context-parallel-size 2
    --cp-comm-type p2p
)

torchrun ${DISTRIBUTED_ARGS[@]} pretrain_mamba.py \
    ${MODEL_ARGS[@]} ${TRAINING_ARGS[@]} ${MODEL_PARALLEL_ARGS[@]} \
    --data-path $DATA_PATH --vocab-size 50257 --tokenizer-type GPT2BPETokenizer \
    --save /ckpt/hybrid --save-interval 500 --log-interval 10 --spec seqpar.megatron.spec layer_spec
