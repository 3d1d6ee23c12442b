// The koajax page: uploads radiographs to POST /predict and shows each knee.
'use strict';

const drop = document.getElementById('drop');
const input = document.getElementById('files');
const statusLine = document.getElementById('status');
const kneesBox = document.getElementById('knees');
const skippedList = document.getElementById('skipped');
const downloadButton = document.getElementById('download');
let lastAnswer = null;

function element(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}

function bars(head) {
  // One bar per class, its height the probability; the predicted class stands out.
  const box = element('div', {class: 'bars', title: 'class probabilities'});
  const top = head.probabilities.indexOf(Math.max(...head.probabilities));
  head.probabilities.forEach((p, k) => {
    const bar = element('div', {class: k === top ? 'bar top' : 'bar',
                                'data-p': p.toFixed(4),
                                title: `${head.classes[k]}: ${(100 * p).toFixed(1)} %`});
    bar.style.height = `${Math.max(1, 100 * p)}%`;
    bar.append(element('span', {}, String(head.classes[k])));
    box.append(bar);
  });
  return box;
}

function kneeCard(knee) {
  const card = element('article', {class: 'knee', 'data-knee': knee.knee});
  card.append(element('h2', {}, `${knee.knee} (${knee.side === 'R' ? 'right' : 'left'} knee)`));
  card.append(element('img', {src: knee.gradcam_png,
                              alt: `Grad-CAM of ${knee.gradcam.head} on ${knee.knee}`}));
  const table = element('table', {},
      element('tr', {}, element('th', {}, 'head'), element('th', {}, 'grade'),
              element('th', {}, 'p'), element('th', {}, 'uncertainty')));
  for (const [name, head] of Object.entries(knee.heads)) {
    const k = head.classes.indexOf(head.grade);
    const row = element('tr', {class: 'head', 'data-head': name},
        element('td', {}, name), element('td', {class: 'grade'}, String(head.grade)),
        element('td', {}, head.probabilities[k].toFixed(3)),
        element('td', {}, head.uncertainty.toFixed(3)));
    const barRow = element('tr', {class: 'barrow'}, element('td', {colspan: '4'}, bars(head)));
    table.append(row, barRow);
  }
  card.append(table);
  const where = knee.localisation.from === 'localizer'
      ? 'landmarks by the localiser' : knee.localisation.from === 'png'
      ? 'a knee PNG' : 'landmarks from a file';
  card.append(element('p', {class: 'note'},
      `${where}; uncertainty: ${knee.uncertainty_kind.replace(/_/g, ' ')}; heatmap: ` +
      `${knee.gradcam.head} grade ${knee.gradcam.grade}`));
  return card;
}

async function send(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append('files', file, file.name);
  statusLine.textContent = `grading ${files.length} file(s)\u2026`;
  kneesBox.replaceChildren();
  skippedList.replaceChildren();
  downloadButton.disabled = true;
  let answer;
  try {
    const response = await fetch('/predict', {method: 'POST', body: form});
    answer = await response.json();
  } catch (error) {
    statusLine.textContent = `the service did not answer: ${error}`;
    return;
  }
  lastAnswer = answer;
  downloadButton.disabled = false;
  const knees = answer.knees || [];
  for (const knee of knees) kneesBox.append(kneeCard(knee));
  for (const s of answer.skipped || []) {
    skippedList.append(element('li', {}, `${s.input}${s.knee ? ' (' + s.knee + ')' : ''}: ${s.reason}`));
  }
  statusLine.textContent = `${knees.length} knee(s) graded` +
      ((answer.skipped || []).length ? `, ${answer.skipped.length} skipped` : '');
}

downloadButton.addEventListener('click', () => {
  const blob = new Blob([JSON.stringify(lastAnswer, null, 1)], {type: 'application/json'});
  const link = element('a', {href: URL.createObjectURL(blob), download: 'koajax-predictions.json'});
  document.body.append(link);
  link.click();
  link.remove();
});
input.addEventListener('change', () => send([...input.files]));
drop.addEventListener('dragover', (event) => { event.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (event) => {
  event.preventDefault();
  drop.classList.remove('over');
  send([...event.dataTransfer.files]);
});

fetch('/model').then((r) => r.json()).then((info) => {
  const heads = info.heads.map((h) => h.name).join(', ');
  document.getElementById('model').textContent =
      `${info.runs.length} run(s), task ${info.task} (heads ${heads}); uncertainty: ` +
      `${info.uncertainty.kind.replace(/_/g, ' ')}; koajax ${info.koajax}`;
});
