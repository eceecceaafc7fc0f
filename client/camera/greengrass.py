"""Greengrass IPC through awsiotsdk's GreengrassCoreIPCClientV2: local publish/subscribe and IoT Core.

The SDK finds the nucleus through AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT and
authenticates with SVCUID, both set by the nucleus for the component it runs.
"""

from __future__ import annotations

from typing import Any

from .config import DEFAULT_QOS
from .sinks import Transport


class GreengrassTransport(Transport):
    """Settings: topic (local, a template with {camera} and {model}), iot_core_topic (same),
    qos (AT_MOST_ONCE or AT_LEAST_ONCE, for IoT Core), timeout."""

    name = "greengrass"

    def __init__(self, settings: dict[str, Any]) -> None:
        self._topic: str | None = settings.get("topic")
        self._iot_core_topic: str | None = settings.get("iot_core_topic")
        self._qos = str(settings.get("qos", DEFAULT_QOS))  # a QOS name, checked by config.py
        self._timeout = float(settings.get("timeout", 10.0))
        self._client: Any = None
        self._local_done: bytes | None = None  # retried after an IoT Core failure: not published twice

    def deliver(self, event: dict[str, Any], payload: bytes) -> None:
        from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
        from awsiot.greengrasscoreipc.model import QOS, JsonMessage, PublishMessage

        if self._client is None:
            self._client = GreengrassCoreIPCClientV2()
        names = {"camera": event.get("camera", ""), "model": event.get("model", "")}
        if self._topic and payload != self._local_done:
            self._client.publish_to_topic_async(
                topic=self._topic.format(**names),
                publish_message=PublishMessage(json_message=JsonMessage(message=event)),
            ).result(self._timeout)
            self._local_done = payload
        if self._iot_core_topic:
            self._client.publish_to_iot_core_async(
                topic_name=self._iot_core_topic.format(**names), qos=getattr(QOS, self._qos), payload=payload
            ).result(self._timeout)

    def reset(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            client.close(executor_wait=False)
