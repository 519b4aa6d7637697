# The benchmark on NVIDIA GPUs: NVIDIA's PyTorch container (CUDA, cuDNN, NCCL, and torch /
# torchvision built for them) plus this package, its other dependencies and the test extra.
#   docker build -t sdcore .
#   docker run --gpus all --ipc=host -v $PWD/data:/workspace/sdcore/data ... sdcore \
#       snakemake --profile profiles/local train
FROM nvcr.io/nvidia/pytorch:25.04-py3

ENV NO_ALBUMENTATIONS_UPDATE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/sdcore
COPY . .

# Pin the container's own torch and torchvision so that pip keeps these CUDA builds instead of
# replacing them with PyPI wheels while it resolves pyproject.toml's ranges.
RUN pip list --format=freeze | grep -E '^(torch|torchvision)==' > /tmp/container-torch.txt \
    && pip install --no-cache-dir --constraint /tmp/container-torch.txt -e ".[test]" \
    && rm /tmp/container-torch.txt

CMD ["bash"]
