"""Pure torch math, no Flower: data, models, training, distillation, unlearning, pruning, metrics."""
