//! Model file reading.
