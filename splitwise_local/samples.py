"""The seed's two sample chat requests, and a small client that sends them to the proxy.

One place for both, so `scripts/demo.sh`, the launcher's ready banner and the end-to-end tests
send the same prompts: a short "San Francisco" chat, and a long (~1,000-token) San Francisco
passage whose KV spans several store chunks, which is what makes disaggregation visible.

`python -m splitwise_local.samples --url http://127.0.0.1:8030` sends both and prints the answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

SHORT_PROMPT = "Tell me about San Francisco."

SAN_FRANCISCO_PASSAGE = (
    "San Francisco sits at the northern tip of a hilly peninsula, with the Pacific Ocean to the "
    "west, the Golden Gate strait to the north and San Francisco Bay to the east. The Ohlone "
    "people lived along these shores for thousands of years before Spanish soldiers and "
    "missionaries arrived in 1776 and founded the Presidio and the Mission San Francisco de Asis, "
    "which locals still call Mission Dolores. For decades the settlement of Yerba Buena was a "
    "small trading post where ships exchanged goods for hides and tallow. Everything changed in "
    "1848, when gold was found in the foothills of the Sierra Nevada. Within two years the town "
    "grew from about a thousand people to more than twenty-five thousand, and the harbor filled "
    "with abandoned ships whose crews had run off to the gold fields; some of those hulls were "
    "dragged ashore and turned into stores, hotels and even a jail, and their timbers still lie "
    "beneath the streets of the Financial District. The city became the financial and cultural "
    "capital of the American West, with banks, newspapers, theaters and a busy port that linked "
    "California to Asia and the rest of the world. On the morning of April 18, 1906, a great "
    "earthquake shook the city, and the fires that followed burned for three days and destroyed "
    "most of the downtown area. More than half of the population lost their homes, and thousands "
    "of people lived in tents in Golden Gate Park and the Presidio. The city rebuilt quickly, and "
    "in 1915 it hosted the Panama-Pacific International Exposition to show the world that it had "
    "recovered; the Palace of Fine Arts, built for that fair, still stands in the Marina "
    "District. In the 1930s two great bridges opened within a year of each other: the San "
    "Francisco-Oakland Bay Bridge in 1936 and the Golden Gate Bridge in 1937. The Golden Gate "
    "Bridge, painted in a color called international orange, was for many years the longest "
    "suspension bridge in the world, and its towers often rise above a thick layer of summer fog "
    "that rolls in from the ocean in the afternoon. The fog is so familiar that residents have "
    "given it a name, Karl, and visitors who expect warm California weather are often surprised "
    "to find that July can be cold and gray while September and October are the warmest months "
    "of the year. The city is famous for its steep streets, and its cable cars, first introduced "
    "in 1873 by Andrew Hallidie, still climb Nob Hill and Russian Hill, pulled by cables that run "
    "under the street. Lombard Street, with its eight sharp turns lined with flowers, is one of "
    "the most photographed roads in the country. In the middle of the bay sits Alcatraz Island, "
    "once a military fort and later a federal prison that held famous inmates such as Al Capone "
    "before it closed in 1963; today ferries carry visitors to tour its cell blocks. San "
    "Francisco is also a city of neighborhoods. Chinatown, one of the oldest and largest in North "
    "America, is packed with markets, bakeries, temples and family associations. North Beach grew "
    "up around Italian immigrants and later became the home of the Beat poets, whose City Lights "
    "bookstore still sells books on Columbus Avenue. The Mission District is known for its "
    "colorful murals and its taquerias, where the large Mission-style burrito was popularized. "
    "Haight-Ashbury became the center of the counterculture during the Summer of Love in 1967, "
    "and the Castro became one of the first and best known gay neighborhoods in the United "
    "States, where Harvey Milk was elected to the Board of Supervisors in 1977. Along the "
    "waterfront, Fisherman's Wharf and Pier 39 draw crowds who come to eat clam chowder in "
    "sourdough bread bowls and to watch the sea lions that took over the docks after the 1989 "
    "Loma Prieta earthquake. The Ferry Building, with its clock tower, now houses a busy food "
    "market and a farmers market several days a week. Golden Gate Park, larger than New York's "
    "Central Park, holds museums, gardens, lakes, a herd of bison and the oldest public "
    "conservatory in the Western Hemisphere. In the second half of the twentieth century, the "
    "region to the south became known as Silicon Valley, and San Francisco itself became a center "
    "for technology companies, startups and venture capital, which brought new wealth, new "
    "buildings and a sharp rise in the cost of housing. The city's economy today rests on "
    "technology, finance, tourism and health care, and it is home to universities, research "
    "hospitals, an opera, a symphony and a ballet company that is the oldest in the country. Its "
    "sports teams include the Giants, who play baseball in a ballpark beside the bay where home "
    "runs sometimes splash into the water, and the Golden State Warriors, who returned to the "
    "city in 2019. Despite its fame, San Francisco is a small city by area, only about seven "
    "miles across, and with around eight hundred thousand residents it is densely populated. Its "
    "people are known for their interest in food, the arts, the environment and new ideas, and "
    "the city has long welcomed immigrants from every part of the world, which shows in its many "
    "languages, festivals and restaurants. Its hills offer views of the bay, the bridges and the "
    "ocean, and on a clear evening, when the fog pulls back and the lights come on across the "
    "water, it is easy to see why so many people have left their hearts there."
)

LONG_PROMPT = (
    "Read the following passage about San Francisco and then answer the question.\n\n"
    f"{SAN_FRANCISCO_PASSAGE}\n\n"
    "Question: What happened in San Francisco in 1906, and how did the city recover?"
)


@dataclass(frozen=True)
class Sample:
    name: str
    prompt: str
    max_tokens: int


SAMPLES: tuple[Sample, ...] = (
    Sample("short", SHORT_PROMPT, 64),
    Sample("long", LONG_PROMPT, 64),
)


def chat_request(model: str, sample: Sample, stream: bool = False) -> dict:
    """The OpenAI chat request body for one sample; greedy, so answers are repeatable."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": sample.prompt}],
        "max_tokens": sample.max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def served_model(client: httpx.Client, url: str) -> str:
    """The name the system serves its model under (first entry of GET /v1/models)."""
    response = client.get(f"{url}/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def ask(client: httpx.Client, url: str, body: dict) -> str:
    """Sends a chat request, whole or streamed as `body` says, and returns the answer's text."""
    endpoint = f"{url}/v1/chat/completions"
    if not body.get("stream"):
        response = client.post(endpoint, json=body)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"]
    parts: list[str] = []
    with client.stream("POST", endpoint, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[len("data: ") :])["choices"]:
                parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


def is_up(url: str, timeout: float = 2.0) -> bool:
    """True when the proxy answers GET /health with 200 (both engine roles reachable)."""
    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m splitwise_local.samples", description="send the sample requests"
    )
    parser.add_argument("--url", default="http://127.0.0.1:8030", help="the proxy's base URL")
    parser.add_argument("--stream", action="store_true", help="stream the answers")
    parser.add_argument("--api-key", help="Bearer token, if the proxy requires one")
    parser.add_argument(
        "--check", action="store_true", help="only report (exit status) whether the proxy is up"
    )
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    if args.check:
        return 0 if is_up(url) else 1
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        with httpx.Client(timeout=600.0, headers=headers) as client:
            model = served_model(client, url)
            for sample in SAMPLES:
                shown = sample.prompt if len(sample.prompt) < 100 else sample.prompt[:97] + "..."
                print(f"\n>>> {sample.name} prompt ({len(sample.prompt)} characters): {shown}")
                began = time.monotonic()
                answer = ask(client, url, chat_request(model, sample, args.stream))
                print(f"<<< answer in {time.monotonic() - began:.1f} s:\n{answer.strip()}")
    except httpx.HTTPError as exc:
        print(f"error: request to {url} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
