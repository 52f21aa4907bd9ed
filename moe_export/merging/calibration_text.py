"""A small built-in calibration text (written for moe-export), one sample per line.

Mixed registers on purpose (prose, instructions, code, numbers, dialogue) so routers see a spread of
inputs. It is a fallback: real calibration should use text from the adapter's own task (`--data`).
"""

from __future__ import annotations

CALIBRATION_TEXT = r"""
The river had risen overnight, and by morning the footbridge near the mill stood ankle-deep in brown water.
To bake a simple loaf, mix flour, water, salt and a little yeast, knead for ten minutes, then let it rest until doubled.
Question: what is the capital of Canada? Answer: Ottawa, which sits on the south bank of the Ottawa River.
def mean(values):\n    return sum(values) / len(values) if values else 0.0
The patient reported a mild headache and fatigue for three days; temperature was normal and blood pressure 118/76.
In 1969 two astronauts walked on the Moon while a third circled overhead in the command module.
Please summarise the following paragraph in one sentence, keeping the names and the dates.
A hash map stores key-value pairs and finds a key in expected constant time by hashing it to a bucket.
She closed the notebook, looked out at the rain, and decided that the letter could wait until Monday.
The derivative of x squared is two x, and the integral of one over x is the natural logarithm of x.
SELECT name, COUNT(*) FROM orders WHERE created_at > '2024-01-01' GROUP BY name ORDER BY 2 DESC;
Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplasts of plant cells.
User: can you recommend a book about the history of mathematics? Assistant: try a survey that starts with Babylonian tables.
The committee approved the budget by a vote of seven to two, with one member abstaining.
for (int i = 0; i < n; ++i) { total += weights[i] * inputs[i]; }
Most bridges expand on hot days, so engineers leave small gaps called expansion joints between sections.
Translate into French: the train leaves at half past eight from platform four.
A balanced diet includes vegetables, whole grains, protein and enough water throughout the day.
The old lighthouse keeper counted the ships each evening and wrote their names in a leather ledger.
If a shop sells 240 apples in 6 hours, it sells on average 40 apples per hour.
Gradient descent updates each parameter by a small step against the gradient of the loss.
The museum reopened after two years of repairs, and the first visitors queued in the cold before dawn.
Write a short poem about autumn leaves that uses the word copper at least once.
Water boils at a lower temperature on a mountain because the air pressure there is lower.
import json\nwith open("config.json") as f:\n    settings = json.load(f)
The contract may be terminated by either party with thirty days of written notice.
Honey never really spoils: jars found in ancient tombs were still edible after thousands of years.
Step 1: unplug the device. Step 2: remove the back panel. Step 3: replace the battery and close the panel.
The orchestra tuned to a single note from the oboe before the conductor raised her baton.
Prime numbers have exactly two divisors; the first few are 2, 3, 5, 7, 11 and 13.
A strong password is long, unique for each site, and stored in a password manager rather than on paper.
The village market sells cheese, bread, olives and fresh fish every Saturday morning.
Explain the difference between weather and climate to a ten-year-old.
Light from the Sun takes a little over eight minutes to reach the Earth.
The function returned None because the loop exited before the condition was ever met.
Our quarterly revenue grew by twelve percent, mostly from new customers in the northern region.
He tied the boat to the post, climbed onto the pier and walked towards the only lit window in town.
Vaccines train the immune system to recognise a pathogen without causing the disease itself.
git commit -m "fix off-by-one error in the pagination helper"
A triangle's angles always add up to one hundred and eighty degrees in flat geometry.
The recipe calls for two cups of rice, three cups of water and a pinch of saffron.
Many birds migrate thousands of kilometres each year, guided by the stars, the Sun and the Earth's magnetic field.
Dear customer, your order has been shipped and should arrive within three to five working days.
The proof proceeds by induction: the claim holds for n equal to one, and each case implies the next.
Rain is expected in the afternoon, with winds from the west and temperatures around fourteen degrees.
The chess player sacrificed a knight to open the king's file, then forced checkmate in four moves.
Compilers translate source code into machine instructions, often optimising loops and removing dead code.
Turn left at the bakery, continue past the school, and the library is the red building on your right.
The expedition reached the summit at noon, planted a small flag and began the long descent before the storm.
Sorting a list of n items by comparison needs on the order of n log n comparisons in the worst case.
"""


def builtin_lines() -> list[str]:
    """The built-in samples, one per non-empty line (escaped newlines restored inside code samples)."""
    return [line.replace("\\n", "\n") for line in CALIBRATION_TEXT.splitlines() if line.strip()]
