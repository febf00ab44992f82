# CPU image: docker build -t lorapipe . && docker run --rm lorapipe
# For a GPU step operator, start FROM a CUDA PyTorch image and use: make setup TORCH_CONSTRAINTS=/dev/null EXTRAS=cuda,tracking
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends make git gcc g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY constraints ./constraints
COPY lorapipe ./lorapipe
COPY steps ./steps
COPY pipelines ./pipelines
COPY materializers ./materializers
COPY configs ./configs
COPY data ./data
RUN make setup EXTRAS=tracking,test && make tiny-model
ENV ZENML_ANALYTICS_OPT_IN=false
CMD ["make", "quickstart"]
