# GPU worker: PyTorch + CUDA base image, the project with its worker extra.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
WORKDIR /app
COPY pyproject.toml README.md ./
COPY broker_worker ./broker_worker
COPY gateway ./gateway
RUN pip install --no-cache-dir ".[worker]"
ENV WORKER_DEVICE=auto
ENTRYPOINT ["broker-worker"]
CMD ["run"]
