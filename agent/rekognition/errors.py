"""The errors of the Rekognition API as the endpoint returns them: an AWS error code (the
`__type` botocore reads into `ClientError.response["Error"]["Code"]`), a message and an HTTP status."""

from __future__ import annotations

# Client errors of the Rekognition service model (botocore's rekognition service-2.json).
ACCESS_DENIED = "AccessDeniedException"
IMAGE_TOO_LARGE = "ImageTooLargeException"
INVALID_IMAGE_FORMAT = "InvalidImageFormatException"
INVALID_PAGINATION_TOKEN = "InvalidPaginationTokenException"
INVALID_PARAMETER = "InvalidParameterException"
INVALID_S3_OBJECT = "InvalidS3ObjectException"
LIMIT_EXCEEDED = "LimitExceededException"
THROUGHPUT_EXCEEDED = "ProvisionedThroughputExceededException"
RESOURCE_IN_USE = "ResourceInUseException"
RESOURCE_NOT_FOUND = "ResourceNotFoundException"
RESOURCE_NOT_READY = "ResourceNotReadyException"
INTERNAL_SERVER_ERROR = "InternalServerError"
# Errors every AWS JSON service returns before an operation runs.
SERIALIZATION = "SerializationException"
UNKNOWN_OPERATION = "UnknownOperationException"
REQUEST_TOO_LARGE = "RequestEntityTooLargeException"
MISSING_AUTHENTICATION_TOKEN = "MissingAuthenticationTokenException"
INCOMPLETE_SIGNATURE = "IncompleteSignatureException"
INVALID_SIGNATURE = "InvalidSignatureException"
UNRECOGNIZED_CLIENT = "UnrecognizedClientException"


class RekognitionError(Exception):
    """A request the endpoint refuses or cannot serve."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


def internal_error(message: str) -> RekognitionError:
    return RekognitionError(INTERNAL_SERVER_ERROR, message, status=500)
