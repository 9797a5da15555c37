# cifar5m on a CUDA PyTorch base: the base image's torch satisfies the extras'
# `torch>=2.2`, so pip keeps it and installs only the rest.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1

WORKDIR /opt/cifar5m
COPY pyproject.toml README.md ./
COPY cifar5m ./cifar5m
# labelers: transformers and timm; timm needs torchvision built for the same torch, which
# the base image ships (docs/labelers.md).
RUN pip install ".[generate,train,serve,labelers]"

WORKDIR /data
EXPOSE 8000
ENTRYPOINT ["cifar5m"]
CMD ["--help"]
