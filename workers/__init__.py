"""ifrender's workers: what runs in the Ray actors of a job (they never import jobs/)."""

from workers.noise import quiet_known_noise

quiet_known_noise()  # before any worker module imports a library that would warn
