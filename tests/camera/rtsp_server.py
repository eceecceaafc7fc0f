"""A loopback RTSP server for the camera tests (run with Debian's python3, which has GStreamer's gi).

    /usr/bin/python3 rtsp_server.py PORT COLOR WIDTH HEIGHT

Serves /stream: an H.264 test pattern of one solid colour (`red` or `grey`) at 10 frames/s.
Prints "ready" once listening.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PATTERNS = {"red": "red", "grey": "gray", "blue": "blue"}


def main() -> None:
    port, color, width, height = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f"( videotestsrc is-live=true pattern={PATTERNS[color]} "
        f"! video/x-raw,width={width},height={height},framerate=10/1 "
        "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 "
        "! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )
    factory.set_shared(True)
    server.get_mount_points().add_factory("/stream", factory)
    if server.attach(None) == 0:
        sys.exit("cannot listen")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
