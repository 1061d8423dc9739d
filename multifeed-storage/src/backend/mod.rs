//! Fast `random-access-storage` backends (owned by the backend work; placeholder).
