# Gateway (and UI): slim Python, no torch.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY broker_worker ./broker_worker
COPY gateway ./gateway
COPY ui ./ui
ARG EXTRAS=gateway
RUN pip install --no-cache-dir ".[${EXTRAS}]"
ENTRYPOINT ["broker-gateway"]
