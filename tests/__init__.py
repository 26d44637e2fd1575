"""metarun's tests: a regular package, so that `tests.fixtures` is ours even where an installed
package ships a top-level `tests` (learn2learn 0.2.0 does)."""
