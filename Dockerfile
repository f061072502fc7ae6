# nougat-dist: Meta's unmodified Nougat OCR on every GPU of a box or a Slurm job.
#
#   docker build -t nougat-dist .                      # add --build-arg NOUGAT_MODEL=0.1.0-small
#                                                      # to bake that checkpoint into the image
#   docker run --gpus all --ipc=host -v /data:/data nougat-dist \
#       run --input /data/papers --output /data/out    # one GPU
#   docker run --gpus all --ipc=host -v /data:/data --entrypoint torchrun nougat-dist \
#       --nproc_per_node=gpu --no-python nougat-dist run --input /data/papers --output /data/out
#   docker run nougat-dist --help
#
# --ipc=host (or a large --shm-size): render workers hand pages to the model through /dev/shm,
# which Docker caps at 64 MB by default.
#
# NOT BUILT HERE: the project's machines have no Docker engine. This file is linted in CI
# (tests/test_dockerfile.py) and its pins are checked against requirements.txt; the first real
# build is its first run.
#
# Base: PyTorch's official CUDA runtime image for the pinned torch (requirements.txt), which brings
# CUDA 13.0 + cuDNN 9 and conda's Python 3.11 (PyTorch's Dockerfile default; checked below).
# Pin it by digest once it has been pulled and verified, as
#   FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime@sha256:<digest>
# The digest is not written here because it could not be looked up from this machine; a digest
# that nobody has verified would be worse than none. `docker buildx imagetools inspect` shows it.
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    NLTK_DATA=/opt/nltk_data \
    PYTHONPATH=/app

# One apt layer. No RAR tool: the unrar2-cffi wheel (requirements.txt) bundles the UnRAR library.
# libglib2.0-0 is needed by opencv (pulled in by albumentations) even in its headless build.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# The base's Python must be the one the pins were measured on.
RUN python -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version"

WORKDIR /app
# Pinned runtime requirements; constraints.txt is the full measured freeze. Its CUDA runtime wheels
# (nvidia-*, cuda-*, triton) are left to the base image, whose torch was built against them; torch
# and torchvision stay pinned by requirements.txt (pip keeps the base's copy when it matches).
COPY requirements.txt constraints.txt ./
RUN grep -vE '^(nvidia-|cuda-|triton==)' constraints.txt > /tmp/constraints-image.txt \
    && python -m pip install -r requirements.txt -c /tmp/constraints-image.txt \
    && rm /tmp/constraints-image.txt

# nougat's markdown postprocessing looks words up in nltk's `words` corpus; without it the text
# differs from the stock CLI's. Fetched once here, not at run time (nodes are often offline).
RUN python -m nltk.downloader -d "$NLTK_DATA" words

COPY launch.py pyproject.toml README.md ./
COPY nougat_dist ./nougat_dist
COPY slurm ./slurm
# The package itself and its `nougat-dist` console script; --no-deps keeps the pinned stack above.
RUN python -m pip install --no-deps /app

# Run as a user, not root. Checkpoints go to $HOME/.cache/torch/hub (mount it to keep downloads).
RUN useradd --create-home --uid 1000 --shell /bin/bash nougat
USER nougat

# Optional: a checkpoint baked in through nougat's own downloader, into the torch hub dir where a
# run with `--model $NOUGAT_MODEL` finds it (the network is needed at build time only).
ARG NOUGAT_MODEL=""
RUN if [ -n "$NOUGAT_MODEL" ]; then \
        python -c "import sys; from nougat.utils.checkpoint import get_checkpoint; print(get_checkpoint(model_tag=sys.argv[1]))" "$NOUGAT_MODEL"; \
    fi

# Smoke test: the pinned stack really imports (torch, nougat and the RAR library, not just the
# flag parser), then the console script answers.
RUN python -c "import torch, torchvision, transformers, timm, nougat, pypdfium2, pyarrow, unrar.cffi, nougat_dist.worker, nougat_dist.ocr.model" \
    && nougat-dist --help

ENTRYPOINT ["nougat-dist"]
CMD ["--help"]
