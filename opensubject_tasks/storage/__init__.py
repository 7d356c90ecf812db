"""Object storage: one interface, a local-directory and a MinIO/S3 implementation."""
from opensubject_tasks.storage.base import Keys, ObjectInfo, ObjectStore, check_key, safe_key, slug

__all__ = ["Keys", "ObjectInfo", "ObjectStore", "check_key", "safe_key", "slug", "make_store"]


def make_store(settings) -> ObjectStore:  # noqa: ANN001 - StoreSettings
    """Build the store named by settings.kind."""
    if settings.kind == "local":
        from opensubject_tasks.storage.local import LocalStore

        return LocalStore(settings.local_root)
    from opensubject_tasks.storage.minio_store import MinioStore

    return MinioStore.from_settings(settings)
