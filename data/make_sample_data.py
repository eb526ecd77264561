"""Write the bundled sample data sets (data/llama2_sample.jsonl, data/baichuan2_sample.jsonl, data/chat_sample.jsonl).

Both files are small, made-up stand-ins for the tutorials' data sets so that the demo runs offline:
  * llama2_sample.jsonl   - short news-like articles with two-sentence highlights (columns article, highlights)
  * baichuan2_sample.jsonl - customer-support requests and answers
                            (columns instruction, category, intent, response)
  * chat_sample.jsonl     - multi-turn conversations (column messages): the user gives a name and a town in the
                            first turn, small talk follows, and the last question can only be answered from that
                            first turn (one of 32 names or 26 towns, repeated word for word), so learning it
                            needs the history
The text comes from the templates and word lists below, filled in with a seeded random generator, so
running this script again gives byte-identical files:  python data/make_sample_data.py
The highlights restate each article's key facts in a fixed pattern per topic: a tiny model learns the
patterns within a few hundred steps and then learns to copy the facts (the demo's visible learning).
"""
import json
import random
import re
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
NUM_ARTICLES = 2000
NUM_SUPPORT_DIALOGUES = 400
NUM_CONVERSATIONS = 1800

# ----------------------------------------------------------------------------------------------
# News articles
# ----------------------------------------------------------------------------------------------
# One-word names, few enough that every value turns up often in the sample.
FIRST_NAMES = ["Maria", "James", "Aisha", "Tom", "Elena", "David", "Priya", "Samuel", "Grace", "Lucas",
               "Nora", "Victor"]
LAST_NAMES = ["Lopez", "Carter", "Okafor", "Brennan", "Novak", "Hughes", "Sharma", "Mensah", "Whitfield",
              "Moreau", "Lindqvist", "Petrov"]
TOWNS = ["Millbrook", "Easton Vale", "Port Ardley", "Ashford Green", "Lakemoor", "Redcliffe", "Northam",
         "Stonebridge", "Kingsmere", "Harlow Bay", "Westfield", "Oakridge", "Brackley", "Fenwick",
         "Silverton", "Cobham Heath", "Dunmore", "Elmstead", "Greyhaven", "Thornbury"]
NEWS_TOWNS = [town for town in TOWNS if " " not in town]  # the support dialogues use all of TOWNS
REGIONS = ["the northern province", "the coastal district", "the river valley", "the eastern county",
           "the capital region", "the southern highlands", "the lake country", "the western plains"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
COMPANIES = ["Brightwave", "Northstar Systems", "Harbor Foods", "Keystone Energy", "Bluepeak Labs",
             "Meridian Motors", "Cedar Health", "Lumen Networks", "Atlas Freight", "Greenleaf Farms"]
PRODUCTS = ["a folding electric bicycle", "a low-cost home battery", "a water filter for rural homes",
            "a budget smartphone", "a heat pump for small flats", "a delivery drone", "a hearing aid",
            "a solar roof tile", "a learning app for children", "a smart thermostat"]
TEAMS = ["Rovers", "United", "Athletic", "City", "Wanderers", "Rangers", "Albion", "Harriers"]
JOBS = ["teacher", "nurse", "bus driver", "shop owner", "engineer", "farmer", "student", "pensioner",
        "software developer", "chef", "carpenter", "librarian"]
# Every number in an article is one of these words, so copying a number means copying one word.
TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def person(rng):
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


# Each topic: facts drawn once per article, a lead sentence with the main facts, a key sentence that repeats
# some of them, optional body sentences and quotes (most repeat a fact too), and two highlights that follow one
# fixed pattern per topic, with the words around each fact as in the article. An article holds one value of
# each kind (one town, one named person, one number) and no other names or numbers, so the tiny demo model
# can learn within its few minutes of training to tell the topic and to copy each fact into its place.
TOPICS = {
    "council_budget": {
        "facts": lambda rng: {
            "town": rng.choice(NEWS_TOWNS), "day": rng.choice(WEEKDAYS), "amount": rng.choice(TENS),
            "project": rng.choice(["a library", "road repairs", "a flood barrier", "a clinic", "cheaper bus fares",
                                   "a youth centre", "street lighting", "a swimming pool"]),
            "official": person(rng),
        },
        "lead": "Councillors in {town} on {day} approved a budget of {amount} million for {project}.",
        "key": "Council leader {official} said the {amount} million would be spent on {project}.",
        "body": [
            "{official} said {town} could no longer wait for {project}.",
            "Officials in {town} said the {amount} million would be released in stages.",
            "Opposition members argued that families in {town} were already struggling with higher bills.",
            "Spending on {project} makes up most of the budget.",
            "Business groups in {town} gave the plan a cautious welcome.",
            "{official} has led the council for many years.",
        ],
        "quotes": [
            "\"This is a budget for the next generation,\" {official} told the chamber.",
            "\"Spending {amount} million on {project} is too much,\" said one councillor.",
        ],
        "highlights": [
            "Councillors in {town} approve a budget of {amount} million for {project}.",
            "Council leader {official} says the money will be spent on {project}.",
        ],
    },
    "storm": {
        "facts": lambda rng: {
            "name": rng.choice(["Agnes", "Bruno", "Celia", "Dermot", "Edith", "Franz", "Gwen", "Hector"]),
            "region": rng.choice(REGIONS), "day": rng.choice(WEEKDAYS), "rain": rng.choice(TENS),
            "town": rng.choice(NEWS_TOWNS),
        },
        "lead": "Storm {name} hit {region} on {day}, bringing {rain} millimetres of rain.",
        "key": "Homes in {town} were left without power after Storm {name} brought {rain} millimetres of rain.",
        "body": [
            "Emergency crews in {town} rescued people from cars cut off by flood water.",
            "Schools across {region} closed early as Storm {name} arrived.",
            "Engineers worked through the night to repair power lines across {region}.",
            "Storm {name} was the strongest storm to hit {region} in a decade.",
            "Forecasters said {rain} millimetres of rain was more than a month's worth.",
            "Forecasters expect calmer weather in {region} by the end of the week.",
        ],
        "quotes": [
            "\"The water came up to the front door in under an hour,\" said one resident of {town}.",
            "\"Storm {name} caught many people by surprise,\" said the emergency chief.",
        ],
        "highlights": [
            "Storm {name} hits {region}, bringing {rain} millimetres of rain.",
            "Homes in {town} were left without power.",
        ],
    },
    "football": {
        "facts": lambda rng: {
            "home": rng.choice(NEWS_TOWNS), "away": rng.choice(TEAMS), "hg": rng.randint(2, 5),
            "ag": rng.randint(0, 1), "day": rng.choice(WEEKDAYS), "scorer": person(rng),
            "place": rng.choice(["first", "second", "third", "fourth"]),
        },
        "lead": "{home} beat the {away} {hg}-{ag} on {day}, with {scorer} scoring twice.",
        "key": "The {hg}-{ag} win moves {home} up to {place} place in the league.",
        "body": [
            "{home} started quickly and took an early lead.",
            "The {away} had chances of their own but were wasteful in front of goal.",
            "{scorer} was cheered by the fans at the final whistle.",
            "Both goals by {scorer} came from close range.",
            "The goalkeeper of the {away} made several fine saves.",
            "{home} are now in {place} place with a game in hand.",
        ],
        "quotes": [
            "\"I am proud of how hard the players worked,\" said the coach of {home}.",
            "\"The fans pushed us on right to the end,\" said {scorer}.",
        ],
        "highlights": [
            "{home} beat the {away} {hg}-{ag}, with {scorer} scoring twice.",
            "The win moves {home} up to {place} place.",
        ],
    },
    "product_launch": {
        "facts": lambda rng: {
            "company": rng.choice(COMPANIES), "product": rng.choice(PRODUCTS), "month": rng.choice(MONTHS),
            "price": rng.choice(TENS), "town": rng.choice(NEWS_TOWNS),
        },
        "lead": "{company} has unveiled {product}, which goes on sale in {month} for {price} dollars.",
        "key": "{company} said {product} will be made in a new factory in {town} from {month}.",
        "body": [
            "Early reviewers praised the design of {product} from {company}.",
            "Shares in {company} rose slightly after the announcement.",
            "Analysts said {price} dollars was less than many had expected.",
            "The product will first be sold online and later in shops in {town}.",
            "Orders for {product} open in {month}.",
            "{company} plans to sell the product in other countries next spring.",
        ],
        "quotes": [
            "\"We wanted something families can afford, so it costs {price} dollars,\" said the head of {company}.",
            "\"The real test is whether people still use it after a month,\" one analyst said.",
        ],
        "highlights": [
            "{company} unveils {product}, on sale in {month} for {price} dollars.",
            "It will be made in a new factory in {town}.",
        ],
    },
    "health_study": {
        "facts": lambda rng: {
            "habit": rng.choice(["walking every day", "eating more vegetables", "sleeping well",
                                 "cutting down on sugary drinks", "reading before bed", "gardening at weekends",
                                 "cycling to work"]),
            "percent": rng.choice(TENS),
            "outcome": rng.choice(["heart disease", "memory problems", "diabetes", "depression",
                                   "high blood pressure", "back pain"]),
            "town": rng.choice(NEWS_TOWNS),
        },
        "lead": "People who kept up {habit} were {percent} percent less likely to develop {outcome}, "
                "a new study has found.",
        "key": "Researchers at the University of {town} found the {percent} percent lower risk of {outcome} "
               "in adults of all ages.",
        "body": [
            "Researchers in {town} asked volunteers about {habit} every year.",
            "However, the study cannot prove that {habit} prevents {outcome}.",
            "A drop of {percent} percent in {outcome} would save health services a lot of money.",
            "Doctors in {town} said simple habits are often the hardest to keep up.",
            "Women and men appeared to benefit to a similar degree.",
            "The findings were published in a medical journal this week.",
        ],
        "quotes": [
            "\"Small habits like {habit} seem to add up,\" said the lead author.",
            "\"Nobody should stop taking their medicine because of one study,\" said one doctor.",
        ],
        "highlights": [
            "A study links {habit} to a {percent} percent lower risk of {outcome}.",
            "The study was carried out at the University of {town}.",
        ],
    },
    "court_case": {
        "facts": lambda rng: {
            "defendant": person(rng), "job": rng.choice(JOBS), "town": rng.choice(NEWS_TOWNS),
            "months": rng.choice(TENS),
            "crime": rng.choice(["stealing money from a charity", "selling fake concert tickets",
                                 "dangerous driving", "a burglary at a jewellery shop",
                                 "fraud involving a building firm", "setting fire to a warehouse"]),
        },
        "lead": "{defendant}, a {job} from {town}, has been sentenced to {months} months in prison for {crime}.",
        "key": "Victims from {town} were in court to hear the {months} month sentence given to {defendant}.",
        "body": [
            "The jury found {defendant} guilty of {crime} after a long trial.",
            "Witnesses described how {defendant} was caught by chance.",
            "The judge said the crime had caused real harm to people in {town}.",
            "Lawyers for {defendant} said they were considering an appeal.",
            "Colleagues said the {job} had seemed honest and hard-working.",
            "Police said the investigation took more than a year to complete.",
        ],
        "quotes": [
            "\"We are relieved that this is finally over,\" one victim from {town} said.",
            "\"This sentence sends a clear message,\" a police spokesperson said.",
        ],
        "highlights": [
            "{defendant}, a {job} from {town}, is jailed for {months} months for {crime}.",
            "Victims from {town} were in court to hear the sentence.",
        ],
    },
    "science": {
        "facts": lambda rng: {
            "town": rng.choice(NEWS_TOWNS),
            "thing": rng.choice(["a rare frog", "a dinosaur nest", "an ancient shipwreck", "a colony of bees",
                                 "a Roman coin hoard", "an underground lake", "a meteorite", "a stone circle"]),
            "region": rng.choice(REGIONS), "age": rng.choice(TENS),
        },
        "lead": "Scientists from the University of {town} have discovered {thing} in {region}.",
        "key": "Tests suggest that {thing} is about {age} thousand years old.",
        "body": [
            "The team from {town} was surprised by how well preserved it was.",
            "The discovery was made during a routine survey of {region}.",
            "A find that is {age} thousand years old is very rare in {region}.",
            "Samples have been sent to laboratories abroad for further tests.",
            "The site in {region} will be protected while the research continues.",
            "Experts in {town} said {thing} could change what is known about {region}.",
        ],
        "quotes": [
            "\"We could hardly believe what we were seeing,\" said the head of the team from {town}.",
            "\"At {age} thousand years old, it is older than we hoped,\" one member of the team said.",
        ],
        "highlights": [
            "Scientists from the University of {town} discover {thing} in {region}.",
            "Tests suggest that it is about {age} thousand years old.",
        ],
    },
    "transport": {
        "facts": lambda rng: {
            "town": rng.choice(NEWS_TOWNS), "region": rng.choice(REGIONS), "month": rng.choice(MONTHS),
            "minister": person(rng), "cost": rng.choice(TENS),
        },
        "lead": "A new rail line linking {town} with {region} will open in {month}, minister {minister} announced.",
        "key": "{minister} said the line would cost about {cost} million and open in {month}.",
        "body": [
            "Trains from {town} will run every few minutes at busy times.",
            "Some residents of {town} are worried about noise during construction.",
            "The {cost} million will come partly from a fund for {region}.",
            "Business leaders in {town} said faster links would help attract new firms.",
            "The first trains are due to run in {month}.",
            "Commuters face long delays on the main road out of {town}.",
        ],
        "quotes": [
            "\"This line will change how people live and work in {region},\" said {minister}.",
            "\"We have heard promises like this before,\" said one commuter.",
        ],
        "highlights": [
            "A new rail line linking {town} with {region} will open in {month}.",
            "Minister {minister} says it will cost about {cost} million.",
        ],
    },
}


def article_length(rng):
    """Words to aim for: short news briefs, so that many fit in the demo's few minutes of training."""
    return rng.randint(20, 40)


def article_sentences(rng, topic, target_words):
    """Lead first; then the key sentence and, up to about target_words, body sentences and quotes, shuffled."""
    extras = rng.sample(topic["body"] + topic["quotes"], len(topic["body"]) + len(topic["quotes"]))
    chosen = [topic["key"]]
    words = len(topic["lead"].split()) + len(topic["key"].split())
    while words < target_words and extras:
        chosen.append(extras.pop(0))
        words += len(chosen[-1].split())
    rng.shuffle(chosen)
    return [topic["lead"]] + chosen


def fill(template, facts):
    """The template with the facts put in, and "a" made "an" where a fact starts with a vowel ("an engineer")."""
    return re.sub(r"\b([Aa]) (?=[aeio])", r"\1n ", template.format(**facts))


def make_article(rng):
    topic = TOPICS[rng.choice(sorted(TOPICS))]
    facts = topic["facts"](rng)
    sentences = [fill(sentence, facts) for sentence in article_sentences(rng, topic, article_length(rng))]
    paragraphs = []
    while sentences:  # paragraphs of 1-3 sentences, as news stories are laid out
        size = rng.randint(1, 3)
        paragraphs.append(" ".join(sentences[:size]))
        sentences = sentences[size:]
    highlights = "\n".join(fill(sentence, facts) for sentence in topic["highlights"])
    return {"article": "\n\n".join(paragraphs), "highlights": highlights}


# ----------------------------------------------------------------------------------------------
# Customer-support dialogues
# ----------------------------------------------------------------------------------------------
# intent -> (category, request phrasings, answer steps). "{order}", "{item}" and friends are filled in.
INTENTS = {
    "create_account": ("ACCOUNT", ["I want to open a new account", "how do I sign up for an account",
                                   "can you help me create an account", "I need to register as a new customer"],
                       ["Go to our website and click \"Sign Up\" at the top right of the page.",
                        "Enter your name, email address and a password of at least ten characters.",
                        "Open the confirmation email we send you and click the link inside it.",
                        "Once confirmed, you can add a delivery address and payment method in \"My Account\"."]),
    "delete_account": ("ACCOUNT", ["I want to close my account", "please delete my account",
                                   "how can I remove my profile and data", "I no longer want an account with you"],
                       ["Sign in and open \"My Account\", then choose \"Privacy and Data\".",
                        "Select \"Close Account\" and confirm with your password.",
                        "Any open orders must be delivered or cancelled before the account can be closed.",
                        "We remove your personal data within thirty days, except what the law requires us to keep."]),
    "edit_account": ("ACCOUNT", ["I need to change the email on my account", "how do I update my profile details",
                                 "can I change the name on my account", "I want to edit my phone number"],
                     ["Sign in and go to \"My Account\", then \"Profile\".",
                      "Click \"Edit\" next to the detail you want to change and type the new value.",
                      "For a new email address, we send a code to confirm it belongs to you.",
                      "Save your changes; they apply to all future orders straight away."]),
    "recover_password": ("ACCOUNT", ["I forgot my password", "I can't log in to my account",
                                     "how do I reset my password", "my password is not working anymore"],
                         ["On the sign-in page, click \"Forgot password?\".",
                          "Enter the email address linked to your account and we will send a reset link.",
                          "The link is valid for one hour, so please use it soon.",
                          "If the email does not arrive, check your spam folder or ask us to resend it."]),
    "place_order": ("ORDER", ["I want to buy {item}", "how do I place an order for {item}",
                              "can you help me order {item}", "I'd like to purchase {item}"],
                    ["Search for {item} on our website and open the product page.",
                     "Choose the size or colour you want and click \"Add to Basket\".",
                     "Open your basket, check the items and click \"Checkout\".",
                     "Confirm your delivery address and payment details, then place the order.",
                     "You will receive a confirmation email with your order number within a few minutes."]),
    "cancel_order": ("ORDER", ["I need to cancel order {order}", "please cancel my order {order}",
                               "how can I cancel the order I placed yesterday", "I changed my mind about order {order}"],
                     ["Sign in and open \"My Orders\".",
                      "Find order {order} and click \"Cancel Order\".",
                      "Choose a reason from the list and confirm the cancellation.",
                      "If the order has already shipped, you can refuse the parcel or return it for a refund.",
                      "Your money is returned to the original payment method within five working days."]),
    "change_order": ("ORDER", ["I want to change the items in order {order}", "can I add something to my order {order}",
                               "how do I change the size in my order", "I need to modify order {order}"],
                     ["Orders can be changed until they are packed, usually within two hours of ordering.",
                      "Open \"My Orders\", select order {order} and click \"Edit Order\".",
                      "Add, remove or change items, then confirm the new total.",
                      "If the edit button is greyed out, the order is already being packed and cannot be changed."]),
    "track_order": ("ORDER", ["where is my order {order}", "how can I track order {order}",
                              "I want to know the status of my order", "my order {order} has not arrived yet"],
                    ["Open \"My Orders\" and select order {order} to see its current status.",
                     "Once it has shipped, you will find a tracking link from the delivery company there.",
                     "Tracking can take up to twenty-four hours to update after dispatch.",
                     "If the parcel has not moved for three days, contact us and we will investigate."]),
    "get_refund": ("REFUND", ["I want a refund for {item}", "how do I get my money back for order {order}",
                              "I'd like to be refunded", "can I get a refund for a faulty {item}"],
                   ["Open \"My Orders\", choose the order and click \"Return or Refund\".",
                    "Select the items and tell us what went wrong; photos help for damaged goods.",
                    "Print the free return label and drop the parcel at any post office.",
                    "We issue the refund as soon as the parcel reaches our warehouse, usually within a week."]),
    "check_refund_policy": ("REFUND", ["what is your refund policy", "can I return something after thirty days",
                                       "do you refund sale items", "how long do I have to ask for a refund"],
                            ["Most items can be returned within thirty days of delivery for a full refund.",
                             "Items must be unused and in their original packaging.",
                             "Sale items can be returned too, but personalised items cannot.",
                             "Faulty products can be returned for up to one year."]),
    "track_refund": ("REFUND", ["where is my refund", "I have not received my refund for order {order}",
                                "how long does a refund take", "can you check the status of my refund"],
                     ["Refunds are processed within two working days of your return reaching us.",
                      "Your bank may then take three to five working days to show the money.",
                      "You can see the refund status under order {order} in \"My Orders\".",
                      "If it has been more than ten days, send us the order number and we will check."]),
    "change_shipping_address": ("SHIPPING", ["I need to change the delivery address for order {order}",
                                             "can I ship my order to a different address",
                                             "I moved, how do I update my shipping address",
                                             "please send order {order} to my office instead"],
                                ["If the order has not shipped, open it in \"My Orders\" and click \"Change Address\".",
                                 "Enter the new address and check the postcode carefully.",
                                 "Once an order has shipped, the address can only be changed by the delivery company.",
                                 "Use the tracking link to ask the courier to redirect the parcel."]),
    "set_up_shipping_address": ("SHIPPING", ["how do I add a shipping address", "I want to save a new delivery address",
                                             "can I have two delivery addresses", "where do I set my default address"],
                                ["Go to \"My Account\" and open \"Addresses\".",
                                 "Click \"Add Address\" and fill in the details.",
                                 "Tick \"Use as default\" if you want it selected automatically at checkout.",
                                 "You can store up to ten addresses and choose one for each order."]),
    "check_payment_methods": ("PAYMENT", ["what payment methods do you accept", "can I pay with {payment}",
                                          "do you take {payment}", "which ways can I pay"],
                              ["We accept credit and debit cards, {payment}, bank transfer and gift cards.",
                               "You choose the payment method at the last step of checkout.",
                               "Cards are charged when the order ships, not when it is placed.",
                               "For bank transfers, the order ships after the payment has arrived."]),
    "payment_issue": ("PAYMENT", ["my payment was declined", "I was charged twice for order {order}",
                                  "there is a problem with my payment", "why did my card payment fail"],
                      ["First, check that the card details and billing address match what your bank holds.",
                       "Some banks block online payments until you approve them in their app.",
                       "If you see two charges, one is usually a temporary hold that disappears within three days.",
                       "If the problem continues, try another payment method or send us the order number."]),
    "check_invoice": ("INVOICE", ["I want to see the invoice for order {order}", "where can I find my invoices",
                                  "can I check my last invoice", "how do I view my bills"],
                      ["Sign in and open \"My Orders\".",
                       "Every order has a \"View Invoice\" button once it has shipped.",
                       "Invoices for the last six years are kept in your account.",
                       "You can download each invoice as a PDF file."]),
    "get_invoice": ("INVOICE", ["please send me an invoice for order {order}", "I need a company invoice",
                                "can I get an invoice with my company name", "how do I get a copy of my invoice"],
                    ["Open order {order} in \"My Orders\" and click \"Download Invoice\".",
                     "To add a company name or tax number, edit your billing details before the order ships.",
                     "For a corrected invoice on an older order, send us the order number and the new details.",
                     "We email corrected invoices within two working days."]),
    "delivery_options": ("DELIVERY", ["what delivery options do you have", "do you offer next day delivery",
                                      "can I collect my order from a shop", "how can my order be delivered"],
                         ["Standard delivery takes three to five working days and is free over fifty dollars.",
                          "Express delivery arrives the next working day if you order before two in the afternoon.",
                          "You can also collect your order from more than five hundred pick-up points.",
                          "The available options for your address are shown at checkout."]),
    "delivery_period": ("DELIVERY", ["how long will delivery take", "when will order {order} arrive",
                                     "how many days does shipping take to {town}", "is my order going to arrive this week"],
                        ["Standard orders usually arrive within three to five working days.",
                         "Deliveries to {town} and other remote areas can take one or two days longer.",
                         "The expected delivery date for order {order} is shown in \"My Orders\".",
                         "Public holidays and bad weather can add a short delay."]),
    "contact_customer_service": ("CONTACT", ["how can I contact customer service", "what are your opening hours",
                                             "I need to speak to someone about my order", "what is your phone number"],
                                 ["Our support team is available by chat from eight in the morning to eight in the evening.",
                                  "You can also call us on weekdays between nine and five.",
                                  "For questions about an order, have the order number ready to save time.",
                                  "Emails are answered within one working day."]),
    "contact_human_agent": ("CONTACT", ["I want to talk to a real person", "can I speak to a human agent",
                                        "please put me through to an agent", "I need a human, not a bot"],
                            ["I can connect you with one of our support agents.",
                             "Please type \"agent\" in this chat, or call us during opening hours.",
                             "Waiting times are usually under five minutes.",
                             "Tell the agent your order number so they can help you straight away."]),
    "complaint": ("FEEDBACK", ["I want to make a complaint", "I am unhappy with the service I received",
                               "your delivery driver was rude", "I want to complain about order {order}"],
                  ["I am sorry to hear about your experience, and thank you for telling us.",
                   "Please describe what happened, including the date and the order number if there is one.",
                   "Our customer care team reviews every complaint and replies within three working days.",
                   "Where we got things wrong, we will explain what we are doing to put it right."]),
    "review": ("FEEDBACK", ["I want to leave a review for {item}", "how do I rate a product",
                            "can I write feedback about your service", "where can I post a review"],
                ["Open \"My Orders\" and click \"Write a Review\" next to the item.",
                 "Give a star rating and describe what you liked or did not like.",
                 "Reviews appear on the product page after a short check, usually within a day.",
                 "Your feedback helps other customers and helps us improve."]),
    "newsletter_subscription": ("SUBSCRIPTION", ["I want to subscribe to your newsletter", "how do I stop your emails",
                                                 "please unsubscribe me from the newsletter",
                                                 "can I sign up for offers by email"],
                                ["Go to \"My Account\" and open \"Email Preferences\".",
                                 "Tick or untick \"Newsletter\" and save your choice.",
                                 "Every newsletter also has an \"Unsubscribe\" link at the bottom.",
                                 "Changes can take up to forty-eight hours to apply."]),
    "check_cancellation_fee": ("CANCEL", ["is there a fee to cancel", "will I be charged for cancelling order {order}",
                                          "how much does it cost to cancel", "do you charge a cancellation fee"],
                               ["Cancelling an order before it ships is always free.",
                                "After shipping, you can return the items for free within thirty days.",
                                "Custom-made items carry a fee of ten percent if cancelled after production starts.",
                                "Any fee is shown before you confirm the cancellation."]),
}
ITEMS = ["a pair of running shoes", "a winter coat", "a coffee machine", "a laptop bag", "a desk lamp",
         "a set of kitchen knives", "a kettle", "wireless headphones", "a garden chair", "a backpack"]
PAYMENTS = ["PayPal", "Apple Pay", "Google Pay", "a gift card", "Klarna"]
POLITE_STARTS = ["", "", "hi, ", "hello, ", "good morning, ", "excuse me, ", "hey, ", "please help, "]
POLITE_ENDS = ["", "", "?", " please", ", thanks", ", can you help?", " asap", ", I'm in a hurry"]
OPENERS = ["I understand that you need help to {need_base}, and I'm happy to help.",
           "Thank you for reaching out. I can certainly help you {need_base}.",
           "I'm sorry for any trouble. Let me explain how to {need_base}.",
           "Of course! Here is how you can {need_base}."]
CLOSERS = ["If anything is unclear, just reply here and I will be glad to help further.",
           "Is there anything else I can help you with today?",
           "Thank you for being our customer, and have a great day!",
           "If you run into any problem along the way, our team is here for you."]
NEED_BASE = {"ACCOUNT": "sort out your account", "ORDER": "handle your order", "REFUND": "deal with your refund",
             "SHIPPING": "manage your shipping address", "PAYMENT": "resolve your payment question",
             "INVOICE": "get your invoice", "DELIVERY": "understand your delivery options",
             "CONTACT": "reach the right person", "FEEDBACK": "share your feedback",
             "SUBSCRIPTION": "manage your email subscription", "CANCEL": "understand cancellation charges"}
EXTRA_NOTES = ["Before you start, make sure you are signed in to the account you used for the order.",
               "If you are using the app, the same options are under the menu button in the top left corner.",
               "Changes made on the website also show up in the app, and the other way round.",
               "If a step does not work as described, try refreshing the page or signing out and in again.",
               "We send a confirmation email after each change, so you always have a record of it.",
               "Our chat team can also do this for you if you prefer; just share the order number {order}.",
               "Please note that some options may look slightly different depending on your country.",
"Please keep your order number {order} handy in case you need to contact us.",
               "You can do all of this from our mobile app as well as from the website.",
               "For your security, we will never ask for your full password by email or chat.",
               "Most customers finish these steps in just a few minutes.",
               "Our help centre also has a short video that walks through each step."]


def make_support_dialogue(rng):
    intent = rng.choice(sorted(INTENTS))
    category, requests, steps = INTENTS[intent]
    fields = {"order": f"#{rng.randint(100000, 999999)}", "item": rng.choice(ITEMS),
              "payment": rng.choice(PAYMENTS), "town": rng.choice(TOWNS)}
    request = rng.choice(requests).format(**fields)
    end = rng.choice(POLITE_ENDS)
    instruction = (rng.choice(POLITE_STARTS) + request + end).strip()
    instruction = instruction[0].upper() + instruction[1:]
    if rng.random() < 0.3:
        instruction += " " + rng.choice(["I tried the website but got confused.", "It's quite urgent.",
                                          "This is my first time ordering.", "My friend said you could help."])

    need_base = NEED_BASE[category]
    opener = rng.choice(OPENERS).format(need_base=need_base)
    lines = [opener, ""]
    numbered = rng.random() < 0.7
    for number, step in enumerate(steps, start=1):
        step = step.format(**fields)
        lines.append(f"{number}. {step}" if numbered else f"- {step}")
    lines.append("")
    for note in rng.sample(EXTRA_NOTES, rng.randint(1, 7)):
        lines.append(note.format(**fields))
    lines.append(rng.choice(CLOSERS))
    response = "\n".join(lines)
    return {"instruction": instruction, "category": category, "intent": intent, "response": response}


# ----------------------------------------------------------------------------------------------
# Conversations that need their history
# ----------------------------------------------------------------------------------------------
# One-token names and towns (in the demo tokenizer), many of each, so that a reply can only be right by copying
# the value the user gave: the commonest value is asked in only a few percent of the conversations.
CHAT_NAMES = ["Agnes", "Aisha", "Bruno", "Celia", "David", "Dermot", "Edith", "Elena", "Franz", "Grace", "Gwen",
              "Hector", "James", "Lucas", "Maria", "Nora", "Priya", "Roman", "Samuel", "Tom", "Victor", "Carter",
              "Hughes", "Lopez", "Mensah", "Moreau", "Novak", "Okafor", "Petrov", "Sharma", "Brennan", "Whitfield"]
CHAT_TOWNS = ["Albion", "Brackley", "Cedar", "Cobham", "Dunmore", "Elmstead", "Fenwick", "Greyhaven", "Harlow",
              "Kingsmere", "Lakemoor", "Millbrook", "Northam", "Oakridge", "Redcliffe", "Silverton", "Stonebridge",
              "Thornbury", "Westfield", "Keystone", "Meridian", "Northstar", "Atlas", "Bluepeak", "Greenleaf",
              "Lumen"]
INTRODUCTIONS = ["Hi, my name is {name} and I live in {town}.",
                 "Hello! I live in {town}. My name is {name}.",
                 "Good morning, my name is {name}. I live in {town}."]
GREETINGS = ["Nice to meet you, {name}.", "Hello {name}, welcome."]
SMALL_TALK = [
    ("Can you recommend a good book?", "Try a short novel."),
    ("What should I cook tonight?", "A simple soup."),
    ("Is it a good day for a walk?", "Yes, go in the afternoon."),
    ("How do I get better sleep?", "Keep the room dark."),
    ("Any tips for saving money?", "Write down what you spend."),
    ("What time is it?", "I cannot see a clock."),
    ("Tell me a fun fact.", "Honey never goes bad."),
]
QUESTIONS = {
    "town": (["Which town do I live in?", "Where do I live?"], "You live in {town}."),
    "name": (["What is my name?", "Do you remember my name?"], "Your name is {name}."),
}
CHAT_SYSTEM = "You are a friendly assistant who remembers what the user says."


def make_conversation(rng):
    """The user gives a name and a town in the first turn; after some small talk one or both of them are asked
    for, and the reply repeats the value the user gave (a copy that only the history makes possible)."""
    facts = {"name": rng.choice(CHAT_NAMES), "town": rng.choice(CHAT_TOWNS)}
    messages = [{"role": "system", "content": CHAT_SYSTEM}] if rng.random() < 0.2 else []
    messages += [{"role": "user", "content": rng.choice(INTRODUCTIONS).format(**facts)},
                 {"role": "assistant", "content": rng.choice(GREETINGS).format(**facts)}]
    asked = rng.sample(sorted(QUESTIONS), rng.randint(1, 2))
    for kind in asked:
        for question, answer in rng.sample(SMALL_TALK, rng.randint(0, 2)):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        asks, answer = QUESTIONS[kind]
        messages += [{"role": "user", "content": rng.choice(asks)},
                     {"role": "assistant", "content": answer.format(**facts)}]
    return {"messages": messages}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    rng = random.Random(20240601)
    write_jsonl(DATA_DIR / "llama2_sample.jsonl", [make_article(rng) for _ in range(NUM_ARTICLES)])
    rng = random.Random(20240602)
    write_jsonl(DATA_DIR / "baichuan2_sample.jsonl", [make_support_dialogue(rng) for _ in range(NUM_SUPPORT_DIALOGUES)])
    rng = random.Random(20240603)
    write_jsonl(DATA_DIR / "chat_sample.jsonl", [make_conversation(rng) for _ in range(NUM_CONVERSATIONS)])


if __name__ == "__main__":
    main()
