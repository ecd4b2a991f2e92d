# syntax=docker/dockerfile:1
# Tidegate: one image for the gateway (`tidegate gateway`) and the operator
# (`tidegate operator`).

FROM python:3.11-slim AS build
WORKDIR /src
# README.m[d]: the readme is optional for the build context.
COPY pyproject.toml README.m[d] ./
# src/tidegate/{gateway,operator} are symlinks to the top-level folders: copy those too.
COPY src ./src
COPY gateway ./gateway
COPY operator ./operator
# The project's wheel and the wheels of all its dependencies (operator extra included).
RUN pip wheel --no-cache-dir --wheel-dir /dist ".[operator]"

FROM python:3.11-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="tidegate" \
      org.opencontainers.image.description="Kubernetes egress gateway: a domain-allowlisting HTTP proxy and its operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install --no-index --find-links=/dist "tidegate[operator]"
USER 65532:65532
EXPOSE 3128 9090
ENTRYPOINT ["tidegate"]
CMD ["gateway", "--help"]
