"""Agent kinds beyond the gradient step: trained, helper, adversarial, defended."""
